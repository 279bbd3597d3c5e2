"""Building blocks: the sparse arch, the teachers and the DAGFM students.

Shape legend used throughout the package: B batch, F fields, D embedding
dimension, L student layers, H CIN layer width (or MLP width), A attention
width.
"""

from kd_dagfm.modules.autoint import AutoIntPlus
from kd_dagfm.modules.cin import CIN
from kd_dagfm.modules.crossnet import CrossNet
from kd_dagfm.modules.dagfm import DAGFM
from kd_dagfm.modules.dcnv2 import DCNv2
from kd_dagfm.modules.deep_dagfm import DeepDAGFM
from kd_dagfm.modules.mlp import MLP
from kd_dagfm.modules.sparse import SparseArch
from kd_dagfm.modules.xdeepfm import XDeepFM

__all__ = [
    "CIN",
    "DAGFM",
    "MLP",
    "AutoIntPlus",
    "CrossNet",
    "DCNv2",
    "DeepDAGFM",
    "SparseArch",
    "XDeepFM",
]
