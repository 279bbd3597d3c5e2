"""Building blocks: the sparse arch, the teachers and the DAGFM student.

Shape legend used throughout the package: B batch, F fields, D embedding
dimension, L student layers, H CIN layer width.
"""

from kd_dagfm.modules.cin import CIN
from kd_dagfm.modules.crossnet import CrossNet
from kd_dagfm.modules.dagfm import DAGFM
from kd_dagfm.modules.sparse import SparseArch

__all__ = ["CIN", "DAGFM", "CrossNet", "SparseArch"]
