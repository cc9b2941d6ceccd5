"""Recordings -> features: what turns new videos into something the model can learn from.

    layout.py     label.csv + Raw/<video_id>/<clip_id>.<ext>: clips, splits, rejected rows
    media.py      PyAV decoding: 16 kHz mono audio, sampled video frames, with caps
    audio.py      openSMILE low-level descriptors at a chosen frame rate
    frames.py     filling frame steps that received nothing from their nearest neighbour
    face.py       dlib face detection + 68 landmarks -> a face geometry vector per frame
    extractor.py  one clip -> (audio, vision) frames; settings, version; a child-process
                  variant for untrusted files
    cache.py      per-clip features keyed by content, span, settings and code version
    job.py        a dataset -> a feature store, with Ray Data on the training cluster
    sample.py     generated clips (a real face, a voiced tone) for tests and the sample dataset

The same extractor, with the settings recorded in the store's manifest, scores a new
recording at prediction time (`mmim.training.predict.predict_recordings`).
"""
