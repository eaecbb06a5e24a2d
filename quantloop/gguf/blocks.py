"""The GGUF grid module: llama.cpp's quantized block layouts, exact levels, rounding and packing, in numpy.

Optimizing quantizers (GPTQ, AWQ, QAT) aim at a GGUF type's exact grid; this
module turns the integers and scales they chose into the bytes llama.cpp reads,
so exporting changes no weight. Types and what one block stores (codes are the
integers exactly as stored; d, m, dmin are fp16):

  Q4_0  32 values  d, q in 0..15      w = d*(q - 8)
  Q4_1  32 values  d, m, q in 0..15   w = d*q + m
  Q5_0  32 values  d, q in 0..31      w = d*(q - 16)   (low nibbles in qs, bit 4 in qh)
  Q5_1  32 values  d, m, q in 0..31   w = d*q + m
  Q8_0  32 values  d, q in -128..127  w = d*q
  Q4_K  256 values d, dmin, 8 x (sc, mn in 0..63), q in 0..15   w = d*sc*q - dmin*mn  (sub-blocks of 32)
  Q5_K  256 values d, dmin, 8 x (sc, mn in 0..63), q in 0..31   w = d*sc*q - dmin*mn  (sub-blocks of 32)
  Q6_K  256 values d, 16 x sc in -128..127, q in 0..63          w = d*sc*(q - 32)     (sub-blocks of 16)
  Q3_K  256 values d, 16 x sc in -32..31, q in 0..7              w = d*sc*(q - 4)      (sub-blocks of 16)
  Q2_K  256 values d, dmin, 16 x (sc, mn in 0..15), q in 0..3   w = d*sc*q - dmin*mn  (sub-blocks of 16)
  IQ4_NL 32 values d, q in 0..15      w = d*KVALUES_IQ4NL[q]   (16 non-uniform levels, -127..113)

Public functions:
  quantize_blocks(w, type) -> QuantBlocks   llama.cpp's rounding (ggml-quants.c quantize_row_*_ref, what
                                            llama-quantize runs without an importance matrix): gguf-py's
                                            numpy ports for block-32 types, ports here for the k-quants and
                                            IQ4_NL (rounding.py, rounding_lowbit.py)
  pack(codes, scales, mins, type[, d, dmin]) -> uint8 (rows, bytes)   the ggml block layout; unpack() inverts
  dequantize(raw, type), fake_quantize(w, type), quantize_to_bytes(w, type)   (gguf-py's dequantizers)
  pack_from_codes(codes, scales, type, zeros, group_size)   GPTQ-style integer codes -> block-32 bytes
  fit_blocks(w, type) -> QuantBlocks       codes and scales of a float weight already on the grid
  gguf_type_for_layout(bits, group_size, symmetric), fallback_type(type, width)
Every one refuses (ValueError) what the type cannot hold exactly, rather than rounding it.
"""

from quantloop.gguf.block_types import (  # noqa: F401
                                        FLOAT_TYPES,
                                        KQUANT_RANGES,
                                        KVALUES_IQ4NL,
                                        QK,
                                        QK_K,
                                        TYPES,
                                        BlockType,
                                        OffGridError,
                                        QuantBlocks,
                                        block_type,
                                        check_type,
                                        fallback_type,
                                        gguf_type_for_layout,
                                        qtype,
)
from quantloop.gguf.fitting import EXACT_RTOL, GRID_RTOL, fit_blocks  # noqa: F401
from quantloop.gguf.packing import dequantize, pack, pack_from_codes, unpack  # noqa: F401
from quantloop.gguf.rounding import fake_quantize, quantize_blocks, quantize_to_bytes  # noqa: F401
