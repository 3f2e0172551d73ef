"""Other precisions of one GGUF file, for `gorgon bench decode --baseline llama.cpp`: every 2-D weight is
dequantized (gguf package) and written again as F32, F16, BF16, Q8_0 or Q4_K, metadata copied. Norms stay F32.

    python -m bench.gguf_variants SmolLM2-135M-Instruct.Q4_1.gguf out/ F32 F16 BF16 Q8_0 Q4_K

Q4_K rows must hold multiples of 256 weights; narrower ones fall back to Q4_1 here (llama.cpp's own
quantizer falls back to Q5_0). The token embedding keeps its type in the quantized variants. The Q4_K quantizer
is a plain one (min/max per sub-block, 6-bit scales), not llama.cpp's search for the best scales: the speed of
the format is what is measured, not its accuracy. For llama.cpp's own mixes (Q4_K_M, IQ4_XS, ...), the `bench`
extra's llama-cpp-python exposes its quantizer: `llama_cpp.llama_model_quantize`."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

QT = GGMLQuantizationType
VARIANTS = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16, "Q8_0": QT.Q8_0, "Q4_K": QT.Q4_K}


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[rows, K] fp32 -> Q4_K blocks [rows, K / 256 * 144]: per 32 weights a scale and a minimum, both
    6-bit multiples of the super-block's fp16 d and dmin."""
    rows, k = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)  # [super-blocks, sub-blocks, 32]
    lo = np.minimum(x.min(-1), 0)
    scale = (x.max(-1) - lo) / 15
    d = np.maximum(scale.max(-1) / 63, 1e-30).astype(np.float16).astype(np.float32)
    dmin = np.maximum(-lo.min(-1) / 63, 1e-30).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    step = np.maximum(d[:, None] * sc, 1e-30)[..., None]
    q = np.clip(np.round((x + (dmin[:, None] * mn)[..., None]) / step), 0, 15).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # sub-blocks 2g (low nibbles) and 2g+1 (high nibbles) share 32 bytes
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                             dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return blocks.reshape(rows, k // 256 * 144)


def convert(source: Path, out: Path, variant: str) -> Path:
    target_type = VARIANTS[variant]
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    target = out / f"{source.stem.rsplit('.', 1)[0]}.{variant}.gguf"
    writer = GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    for t in reader.tensors:
        data = np.asarray(t.data)
        qtype = QT(t.tensor_type)
        keep = len(t.shape) < 2 or (t.name == "token_embd.weight" and target_type not in (QT.F32, QT.F16, QT.BF16))
        if keep:
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
            continue
        dense = dequantize(data, qtype).astype(np.float32)
        if target_type == QT.F32:
            writer.add_tensor(t.name, dense)
            continue
        new_type = target_type
        if target_type == QT.Q4_K and dense.shape[1] % 256:
            new_type = QT.Q4_1
        blocks = quantize_q4_k(dense) if new_type == QT.Q4_K else quantize(dense, new_type)
        writer.add_tensor(t.name, blocks, raw_shape=blocks.shape, raw_dtype=new_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        print(convert(args.source, args.out, variant))


if __name__ == "__main__":
    main()
