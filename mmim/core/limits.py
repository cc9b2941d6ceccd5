"""Caps on what one request or input file may ask of the model (mmim predict, the pyfunc, the REST
server, and the data checks that warn about what prediction would refuse; docs/tracking.md).

The LSTMs take one step per frame and a batch is padded to its longest utterance, so the cost
grows with frames times utterances. The MulT and MMSA releases hold at most 500 frames per
utterance; a 60 s utterance of 100 Hz COVAREP audio (.csd) is 6,000.
"""

MAX_FRAMES = 10_000  # per modality per utterance
MAX_UTTERANCES = 256  # per request
MAX_INPUT_BYTES = 64 * 2**20  # the JSON file `mmim predict` reads

# What a file may declare before anything is built from it (store manifests, checkpoints,
# search spaces, configs); docs/data.md lists them with the limits above.
MAX_TOKENS_CAP = 512  # tokens per utterance: BERT-family encoders hold at most 512 positions
MAX_DIM = 65_536  # features per frame (OpenFace's 709 is the widest release)
MAX_LAYERS = 128  # layers of any stack (LSTM, CPC predictor, the text encoder's transformer)
MAX_YAML_NODES = 100_000  # nodes of a YAML document once its aliases are expanded
MAX_NESTING = 64  # nesting depth of a YAML or JSON document the project reads
MAX_INTEGER_DIGITS = 30  # of an integer in YAML: no setting needs more; Python refuses over 4,300
