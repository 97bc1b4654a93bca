"""The mechanisms, one file each, in the order of the course.

========================  ===============================================  ===========
file                      classes                                          name
========================  ===============================================  ===========
``se.py``                 :class:`SqueezeExcitation`                       ``se``
``eca.py``                :class:`EfficientChannelAttention`               ``eca``
``sk.py``                 :class:`SelectiveKernel`                         ``sk``
``cbam.py``               :class:`CBAM`, ``ChannelGate``, ``SpatialGate``  ``cbam``
``danet.py``              ``PositionAttention``, ``ChannelAttention``,     ``danet``
                          :class:`DualAttention`, ``DANetHead``
``nonlocal_block.py``     :class:`NonLocalBlock` (1D/2D/3D, four forms)    ``nonlocal``
``dia.py``                :class:`DIALSTMCell`, ``DIAStage``               ``dia``
``triple.py``             channel-, element- and scale-wise attention      (densenet121)
========================  ===============================================  ===========

Build them by name with :func:`attn_lib.create_attention`.
"""
from .cbam import CBAM, ChannelGate, SpatialGate
from .danet import ChannelAttention, DANetHead, DualAttention, PositionAttention
from .dia import DIALSTMCell, DIAStage
from .eca import EfficientChannelAttention
from .nonlocal_block import NonLocalBlock
from .se import SqueezeExcitation
from .sk import SelectiveKernel
from .triple import ChannelWiseAttention, ElementWiseAttention, ScaleWiseAttention

__all__ = [
    "CBAM", "ChannelAttention", "ChannelGate", "ChannelWiseAttention", "DANetHead", "DIALSTMCell", "DIAStage",
    "DualAttention", "EfficientChannelAttention", "ElementWiseAttention", "NonLocalBlock", "PositionAttention",
    "ScaleWiseAttention", "SelectiveKernel", "SpatialGate", "SqueezeExcitation",
]
