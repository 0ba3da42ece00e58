"""Pallas attention kernels for GPU (Triton) and TPU (Mosaic); interpret mode on CPU."""

from jaxlm.kernels.common import BLOCK_TABLE, BlockSizes, reference_attention, reference_decode
from jaxlm.kernels.decode import decode_attention
from jaxlm.kernels.flash import flash_attention, flash_attention_with_lse
from jaxlm.kernels.paged import paged_decode_attention, paged_kernel_misfit

__all__ = ["flash_attention", "flash_attention_with_lse", "decode_attention", "paged_decode_attention", "paged_kernel_misfit", "BlockSizes", "BLOCK_TABLE", "reference_attention", "reference_decode"]
