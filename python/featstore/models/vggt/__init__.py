"""featstore's own PyTorch implementation of VGGT, compatible with the published VGGT-1B checkpoint.

Public surface:

- :class:`VGGT`, :class:`Aggregator`, :class:`CameraHead`, :class:`DPTHead` (and the weights-only
  :class:`TrackHead`), with the reference's constructor arguments and call forms;
- :class:`LayerSelectView`: what the aggregator returns when ``selected_layer_idx`` is set;
- :func:`load_vggt`: build and fill a model from a ``.pt`` / ``.safetensors`` checkpoint;
- :func:`preprocess_images` (float, the reference loader) and :func:`preprocess_image_uint8`
  (one image, uint8, for data-loader workers), :func:`to_unit_float`, :func:`stack_uint8_images`;
- :func:`run_vggt`, :func:`extract_layers`, :func:`autocast_dtype`: inference with mixed precision;
- :class:`KVCache` (from :meth:`Aggregator.new_kv_cache`), :func:`stream_history`,
  :func:`window_frame_mask`: causal streaming, as JanusVLN-style models run VGGT.

Importing this package imports torch.
"""

from featstore.models.vggt.aggregator import Aggregator, LayerSelectView
from featstore.models.vggt.camera_head import CameraHead
from featstore.models.vggt.checkpoint import find_checkpoint_file, load_vggt
from featstore.models.vggt.dpt_head import DPTHead
from featstore.models.vggt.inference import (
    aggregator_autocast,
    autocast_dtype,
    extract_layers,
    run_vggt,
    stream_history,
)
from featstore.models.vggt.kv_cache import KVCache, window_frame_mask
from featstore.models.vggt.model import VGGT
from featstore.models.vggt.preprocess import (
    TARGET_SIZE,
    plan_resize,
    preprocess_image_uint8,
    preprocess_images,
    stack_uint8_images,
    to_unit_float,
)
from featstore.models.vggt.track_head import TrackHead

__all__ = [
    "TARGET_SIZE",
    "VGGT",
    "Aggregator",
    "CameraHead",
    "DPTHead",
    "KVCache",
    "LayerSelectView",
    "TrackHead",
    "aggregator_autocast",
    "autocast_dtype",
    "extract_layers",
    "find_checkpoint_file",
    "load_vggt",
    "plan_resize",
    "preprocess_image_uint8",
    "preprocess_images",
    "run_vggt",
    "stack_uint8_images",
    "stream_history",
    "to_unit_float",
    "window_frame_mask",
]
