"""Facial features of a video frame: face geometry from dlib's 68 landmarks.

The CMU-MOSI/MOSEI features came from FACET and OpenFace, neither of which installs
from a package index. dlib does: its HOG face detector finds the face, its 68-point
shape predictor (the model file ships in the `face_recognition_models` package)
places the landmarks, and from those we compute a fixed-length description of where
the face is, how the head is turned and what the mouth, eyes and brows are doing:

    index    name              meaning
    0        face_found        1.0 when a face was found; otherwise the whole vector is 0
    1-3      box               face box centre x, centre y (fractions of the frame's
                               width and height), box width / frame width
    4-6      head_pose         yaw, pitch, roll in radians (see below)
    7        mouth_open        inner-lip gap (landmarks 62-66) / IOD
    8        mouth_width       mouth corner distance (48-54) / IOD
    9        lip_corner_raise  how far the corners (48, 54) sit above the lip
                               midpoints (51, 57), / IOD: positive in a smile
    10-11    eye_open          eye aspect ratio of the person's right eye (36-41,
                               on the image's left), then left eye (42-47)
    12-13    brow_raise        height of each brow (17-21, 22-26) above the centre of
                               the eye under it, / IOD; person's right then left
    14-149   landmarks         the 68 points (x0, y0, x1, y1, ...) in face coordinates

IOD, the inter-ocular distance, is the distance between the two eye centres (the
means of 36-41 and 42-47); dividing by it makes the features independent of how large
the face is in the frame. Face coordinates put the origin midway between the eye
centres, one unit = IOD, x to the image's right along the eye line and y downwards
across it, so an in-plane head tilt does not change them. Features 7-13 are measured
in face coordinates too.

Head pose fits a generic 3-D face (six points: nose tip, chin, outer eye corners,
mouth corners) to its landmarks with OpenCV's solvePnP, taking the focal length as
the frame width and no lens distortion. Signs, as seen in the image: yaw > 0 when the
face turns towards the image's right, pitch > 0 when the chin goes up, roll > 0 when
the head tilts counter-clockwise (the sense of cv2.getRotationMatrix2D's angle). A
frontal, upright face gives roughly (0, 0, 0).

With several faces in the frame, the largest one is described.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import cv2
import dlib
import numpy as np

log = logging.getLogger(__name__)

FACE_LAYOUT: tuple[tuple[str, int, str], ...] = (
    ("face_found", 1, "1.0 when a face was found; otherwise the whole vector is 0"),
    ("box", 3, "face box centre x, centre y (fractions of frame width, height), box width / frame width"),
    (
        "head_pose",
        3,
        "yaw, pitch, roll in radians (yaw > 0: turned to the image's right, "
        "pitch > 0: chin up, roll > 0: tilted counter-clockwise in the image)",
    ),
    ("mouth_open", 1, "inner-lip gap (landmarks 62-66) / IOD"),
    ("mouth_width", 1, "mouth corner distance (48-54) / IOD"),
    ("lip_corner_raise", 1, "height of the mouth corners (48, 54) above the lip midpoints (51, 57) / IOD"),
    ("eye_open", 2, "eye aspect ratio: person's right eye (36-41), then left eye (42-47)"),
    ("brow_raise", 2, "brow height above its eye centre / IOD: right (17-21), then left (22-26)"),
    ("landmarks", 136, "68 (x, y) landmarks, origin between the eyes, eye line horizontal, unit IOD"),
)
FACE_DIM = 150
assert sum(dims for _, dims, _ in FACE_LAYOUT) == FACE_DIM

PREDICTOR_PACKAGE = "face_recognition_models"
PREDICTOR_FILE = "models/shape_predictor_68_face_landmarks.dat"

# Landmark indices (the iBUG 300-W 68-point scheme dlib's predictor follows).
RIGHT_EYE = slice(36, 42)  # the person's right eye: on the image's left
LEFT_EYE = slice(42, 48)
RIGHT_BROW = slice(17, 22)
LEFT_BROW = slice(22, 27)
POSE_POINTS = [30, 8, 36, 45, 48, 54]  # nose tip, chin, outer eye corners, mouth corners

# A generic adult face in millimetres, in camera axes for a frontal face (x to the
# image's right, y down, z away from the camera) with the nose tip at the origin.
# Rough anthropometric proportions; only the shape matters, not the size.
POSE_MODEL = np.array(
    [
        [0.0, 0.0, 0.0],  # 30 nose tip
        [0.0, 70.0, 20.0],  # 8 chin
        [-45.0, -35.0, 35.0],  # 36 outer corner of the person's right eye
        [45.0, -35.0, 35.0],  # 45 outer corner of the left eye
        [-25.0, 30.0, 25.0],  # 48 right mouth corner
        [25.0, 30.0, 25.0],  # 54 left mouth corner
    ]
)
MODEL_EYE_SPAN = 90.0  # mm between the model's outer eye corners


def predictor_path() -> Path:
    """The 68-point model file inside the installed face_recognition_models package."""
    # Found without importing the package: its __init__ needs pkg_resources, which
    # modern setuptools no longer provides.
    spec = importlib.util.find_spec(PREDICTOR_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"dlib's 68-point landmark model is missing: pip install {PREDICTOR_PACKAGE}")
    path = Path(spec.submodule_search_locations[0]) / PREDICTOR_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall {PREDICTOR_PACKAGE}")
    return path


class FaceGeometry:
    """Turns an (H, W, 3) uint8 RGB frame into a (FACE_DIM,) float32 face description."""

    def __init__(self, upsample: int = 0):
        # Each upsampling doubles the frame before detection, so faces half as large are
        # found (without it, faces much narrower than ~80 px are missed), for about
        # four times the time.
        self.upsample = upsample
        path = predictor_path()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        log.debug("dlib HOG face detector (upsample %d), landmarks from %s", upsample, path)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {type(frame).__name__}")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")
        frame = np.ascontiguousarray(frame)  # dlib reads the buffer as packed rows
        faces = self._detector(frame, self.upsample)
        if len(faces) == 0:
            return np.zeros(FACE_DIM, dtype=np.float32)
        box = max(faces, key=lambda rect: rect.area())  # the first one on a tie
        shape = self._predictor(frame, box)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        height, width = frame.shape[:2]
        face = face_coordinates(points)
        return np.concatenate(
            [
                [1.0],
                box_features(box, width, height),
                head_pose(points, width, height),
                expression_features(face),
                face.ravel(),
            ]
        ).astype(np.float32)


def box_features(box: dlib.rectangle, width: int, height: int) -> np.ndarray:
    """Box centre as fractions of the frame, and box width as a fraction of the frame's."""
    centre = box.center()
    return np.array([centre.x / width, centre.y / height, box.width() / width])


def head_pose(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(yaw, pitch, roll) in radians of the generic 3-D face fitted to the landmarks."""
    image_points = points[POSE_POINTS]
    camera = np.array([[width, 0.0, width / 2], [0.0, width, height / 2], [0.0, 0.0, 1.0]])
    # Start the fit from a frontal face at the distance its eye span implies: from its
    # default start (a linear solve on six points) the fit mostly ends in a face behind
    # the camera, upside down.
    eye_span = float(np.linalg.norm(image_points[3] - image_points[2]))
    depth = width * MODEL_EYE_SPAN / max(eye_span, 1.0)
    nose = image_points[0]
    translation = np.array([[(nose[0] - width / 2) * depth / width], [(nose[1] - height / 2) * depth / width], [depth]])
    rotation: np.ndarray = np.zeros((3, 1))
    _, rotation, translation = cv2.solvePnP(
        POSE_MODEL,
        image_points,
        camera,
        None,
        rotation,
        translation,
        useExtrinsicGuess=True,
        flags=cv2.SOLVEPNP_ITERATIVE,
    )
    matrix, _ = cv2.Rodrigues(rotation)
    # Read the rotation as Rz(roll) @ Ry(yaw) @ Rx(pitch) in camera axes (y down, z away
    # from the camera). There yaw > 0 turns the face to the image's left, pitch > 0 tips
    # the chin down and roll > 0 tilts it clockwise on screen; negated, they read the
    # way FACE_LAYOUT describes.
    yaw = np.arcsin(np.clip(-matrix[2, 0], -1.0, 1.0))
    pitch = np.arctan2(matrix[2, 1], matrix[2, 2])
    roll = np.arctan2(matrix[1, 0], matrix[0, 0])
    return -np.array([yaw, pitch, roll])


def face_coordinates(points: np.ndarray) -> np.ndarray:
    """The landmarks with the origin between the eyes, the eye line along x and IOD as unit."""
    right_eye, left_eye = points[RIGHT_EYE].mean(axis=0), points[LEFT_EYE].mean(axis=0)
    dx, dy = left_eye - right_eye
    iod = max(float(np.hypot(dx, dy)), 1e-6)
    cos, sin = dx / iod, dy / iod
    undo_tilt = np.array([[cos, sin], [-sin, cos]])  # rotation by minus the eye line's angle
    return (points - (right_eye + left_eye) / 2) @ undo_tilt.T / iod


def expression_features(face: np.ndarray) -> np.ndarray:
    """mouth_open, mouth_width, lip_corner_raise, eye_open (2), brow_raise (2), from face coordinates."""
    corners_y = (face[48, 1] + face[54, 1]) / 2
    lips_y = (face[51, 1] + face[57, 1]) / 2
    return np.array(
        [
            np.linalg.norm(face[62] - face[66]),
            np.linalg.norm(face[48] - face[54]),
            lips_y - corners_y,  # y points down, so corners above the lips make this positive
            eye_aspect_ratio(face[RIGHT_EYE]),
            eye_aspect_ratio(face[LEFT_EYE]),
            face[RIGHT_EYE, 1].mean() - face[RIGHT_BROW, 1].mean(),
            face[LEFT_EYE, 1].mean() - face[LEFT_BROW, 1].mean(),
        ]
    )


def eye_aspect_ratio(eye: np.ndarray) -> float:
    """Eye height over eye width from its six landmarks (corner, 2 upper, corner, 2 lower)."""
    height = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
    width = float(np.linalg.norm(eye[0] - eye[3]))
    return float(height / (2 * max(width, 1e-6)))
