"""The reference half of the side-by-side benchmark: transformers' Janus
(`JanusForConditionalGeneration`) on the checkpoint the Rust half wrote, the
same inputs, the same measurements, then the table of ratios and the greedy
token agreement.

    python3 model/benches/side_by_side.py DIR [--device cpu|cuda] [--dtype f32|bf16]

DIR holds what `cargo bench -p ulm-model --bench side_by_side -- --dir DIR`
wrote: the checkpoint in the original DeepSeek layout (`config.json`,
`model.safetensors`), `inputs.safetensors` + `inputs.json` (token ids,
pixels, settings) and `ours.json` (our timings and greedy tokens). Run both
with `model/benches/side-by-side.sh`.

The DeepSeek layout is converted here from the checkpoint's own config:
transformers' converter script builds its vision and VQ configs from the
library defaults (SigLIP-L, the 1B VQ), so it only fits the released sizes.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig
from transformers.cache_utils import DynamicCache

# (pattern, replacement) applied in order to every DeepSeek tensor name;
# None drops the tensor (parts the model never runs).
RENAMES = [
    (r"^vision_model\.vision_tower\.attn_pool\..*", None),
    (r"^gen_vision_model\.quantize\.codebook_used$", None),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm(\d)\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.", r"model.vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."),
    (r"^aligner\.layers\.(\d+)\.", lambda m: f"model.aligner.hidden_layers.{int(m.group(1)) // 2 - 1}."),
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.(\d+)\.", lambda m: f"model.generation_aligner.hidden_layers.{int(m.group(1)) // 2 - 1}."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"\.encoder\.conv_blocks\.", ".encoder.down."),
    (r"\.decoder\.conv_blocks\.", ".decoder.up."),
    (r"\.res\.(\d+)\.", r".block.\1."),
    (r"\.mid\.0\.", ".mid.block_1."),
    (r"\.mid\.1\.", ".mid.attn_1."),
    (r"\.mid\.2\.", ".mid.block_2."),
]


def convert_state_dict(tensors):
    out = {}
    for name, tensor in tensors.items():
        new = name
        for pattern, replacement in RENAMES:
            if replacement is None:
                if re.search(pattern, new):
                    new = None
                    break
                continue
            new = re.sub(pattern, replacement, new)
        if new is None:
            continue
        if ".self_attn.qkv." in new:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[new.replace("qkv", part)] = chunk.contiguous()
        elif new.endswith("position_embedding.weight"):
            out[new] = tensor.squeeze(0)
        else:
            out[new] = tensor
    return out


def hf_config(raw, image_token_id):
    lm = raw["language_config"]
    vis = raw["vision_config"]["params"]
    vq = raw["gen_vision_config"]["params"]
    aligner = raw["aligner_config"]["params"]
    gen_aligner = raw["gen_aligner_config"]["params"]
    gen_head = raw["gen_head_config"]["params"]
    # transformers ties these sizes together; a checkpoint where they
    # differ cannot be expressed in its config.
    if vq["encoder_ch_mult"] != vq["decoder_ch_mult"]:
        sys.exit("transformers' VQ has one channel multiplier for encoder and decoder")
    if vq.get("norm_num_groups", 32) != 32 or vq.get("norm_eps", 1e-6) != 1e-6:
        sys.exit("transformers' VQ hard-codes GroupNorm(32, eps 1e-6)")
    if gen_head["image_token_embed"] != lm["hidden_size"] or gen_aligner["n_embed"] != lm["hidden_size"]:
        sys.exit("transformers' generation head and aligner use the language model's width")
    text = LlamaConfig(
        vocab_size=lm["vocab_size"],
        hidden_size=lm["hidden_size"],
        intermediate_size=lm["intermediate_size"],
        num_hidden_layers=lm["num_hidden_layers"],
        num_attention_heads=lm["num_attention_heads"],
        num_key_value_heads=lm["num_key_value_heads"],
        head_dim=lm.get("head_dim", lm["hidden_size"] // lm["num_attention_heads"]),
        max_position_embeddings=lm["max_position_embeddings"],
        rms_norm_eps=lm["rms_norm_eps"],
        rope_theta=lm.get("rope_theta", 10000.0),
        attention_bias=lm.get("attention_bias", False),
        mlp_bias=lm.get("mlp_bias", False),
        tie_word_embeddings=False,
        bos_token_id=lm["bos_token_id"],
        eos_token_id=lm["eos_token_id"],
        pad_token_id=lm["pad_token_id"],
    )
    vision = JanusVisionConfig(
        hidden_size=vis["width"],
        num_hidden_layers=vis["layers"],
        num_attention_heads=vis["heads"],
        image_size=vis["image_size"],
        patch_size=vis["patch_size"],
        layer_norm_eps=vis["layer_norm_eps"],
        mlp_ratio=vis["mlp_hidden_dim"] / vis["width"],
        attention_bias=vis.get("qkv_bias", True),
        projection_dim=aligner["n_embed"],
        depth=aligner["depth"],
        hidden_act="gelu",
        num_image_tokens=(vis["image_size"] // vis["patch_size"]) ** 2,
    )
    vq_cfg = JanusVQVAEConfig(
        embed_dim=vq["codebook_embed_dim"],
        num_embeddings=vq["codebook_size"],
        latent_channels=vq["z_channels"],
        base_channels=vq["ch"],
        channel_multiplier=list(vq["decoder_ch_mult"]),
        num_res_blocks=vq["num_res_blocks"],
        projection_dim=gen_aligner["n_embed"],
        num_hidden_layers=gen_aligner["depth"],
        image_token_embed_dim=gen_head["n_embed"],
        hidden_act="gelu",
    )
    cfg = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq_cfg,
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )
    grid = vq["image_size"] // vq["downsample_factor"]
    if cfg.vq_config.num_patches != grid:
        sys.exit(
            f"transformers decodes a {cfg.vq_config.num_patches}-side code grid (vision image / patch), "
            f"this VQ writes {grid}"
        )
    return cfg


def load_model(dir, device, dtype, image_token_id):
    raw = json.load(open(os.path.join(dir, "config.json")))
    cfg = hf_config(raw, image_token_id)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(cfg)
    state = convert_state_dict(load_file(os.path.join(dir, "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (position ids, rotary tables) are rebuilt below.
    if unexpected or [m for m in missing if "position_ids" not in m]:
        sys.exit(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.model.vision_model.embeddings.position_ids = torch.arange(cfg.vision_config.num_image_tokens).unsqueeze(0)
    rotary = model.model.language_model.rotary_emb
    rotary.__init__(cfg.text_config)
    return model.to(device=device, dtype=dtype).eval()


def median_time(fn, repeats, device):
    times = []
    result = None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Reference:
    def __init__(self, model, inputs, settings, device, dtype):
        self.model, self.settings, self.device, self.dtype = model, settings, device, dtype
        self.inputs = {k: v.to(device) for k, v in inputs.items()}

    def prefill_understanding(self):
        """Vision tower, aligner, merge and the language model over the prompt."""
        m = self.model
        ids = self.inputs["und_ids"].long()
        pixels = self.inputs["und_pixels"].to(self.dtype)
        cache = DynamicCache(config=m.config.text_config)
        out = m(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.cache

    def decode(self, logits, cache, steps, batch):
        """Greedy decode of `steps` tokens for `batch` copies of the row."""
        m = self.model
        if batch > 1:
            cache.batch_repeat_interleave(batch)
            logits = logits.repeat(batch, 1)
        tokens = []
        for _ in range(steps):
            nxt = logits.argmax(-1)
            tokens.append(int(nxt[0]))
            out = m(input_ids=nxt.unsqueeze(1), cache=cache, use_cache=True)
            logits = out.logits[:, -1].float()
        return tokens

    def generate_tokens(self, images, steps):
        """CFG image tokens, greedy, `images` copies of the prompt."""
        m = self.model
        cond = self.inputs["gen_cond_ids"].long().repeat(images, 1)
        uncond = self.inputs["gen_uncond_ids"].long().repeat(images, 1)
        ids = torch.cat([cond, uncond], 0)
        embeds = m.get_input_embeddings()(ids)
        cache = DynamicCache(config=m.config.text_config)
        w = self.settings["cfg_weight"]
        tokens = []
        out = m.model.language_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        for _ in range(steps):
            hidden = out.last_hidden_state[:, -1]
            logits = m.model.generation_head(hidden).float()
            c, u = logits[:images], logits[images:]
            nxt = (u + w * (c - u)).argmax(-1)
            tokens.append(nxt)
            step = m.prepare_embeddings_for_image_generation(torch.cat([nxt, nxt]).unsqueeze(1))
            out = m.model.language_model(inputs_embeds=step, cache=out.cache, use_cache=True)
        return torch.stack(tokens, 1)

    def vq_decode(self, tokens):
        return self.model.model.vqmodel.decode(tokens).float()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    args = parser.parse_args()
    settings = json.load(open(os.path.join(args.dir, "inputs.json")))
    torch.set_num_threads(settings["threads"])
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    model = load_model(args.dir, args.device, dtype, settings["image_token_id"])
    inputs = load_file(os.path.join(args.dir, "inputs.safetensors"))
    ref = Reference(model, inputs, settings, args.device, dtype)
    repeats = settings["repeats"]
    results = {"timings": {}, "greedy": {}}
    t = results["timings"]

    with torch.inference_mode():
        ref.prefill_understanding()  # warm-up
        t["prefill_s"], (logits, _) = median_time(ref.prefill_understanding, repeats, args.device)
        steps = settings["decode_steps"]
        for batch in settings["decode_batches"]:

            def run(batch=batch):
                logits, cache = ref.prefill_understanding()
                sync(args.device)
                start = time.perf_counter()
                tokens = ref.decode(logits, cache, steps, batch)
                sync(args.device)
                return time.perf_counter() - start, tokens

            runs = [run() for _ in range(repeats)]
            t[f"decode_tokens_per_s_b{batch}"] = batch * steps / statistics.median(r[0] for r in runs)
            if batch == 1:
                results["greedy"]["answer"] = runs[0][1]
        image_steps = settings["image_steps"]
        for images in settings["image_batches"]:
            secs, tokens = median_time(lambda: ref.generate_tokens(images, image_steps), repeats, args.device)
            t[f"image_tokens_per_s_b{images}"] = images * image_steps / secs
            if images == 1:
                results["greedy"]["image"] = tokens[0].tolist()
        full = settings["image_tokens"]
        grid = torch.tensor(settings["vq_codes"], device=args.device).unsqueeze(0)
        for images in settings["image_batches"]:
            codes = grid.repeat(images, 1)
            ref.vq_decode(codes)
            t[f"vq_decode_s_b{images}"], pixels = median_time(lambda: ref.vq_decode(codes), repeats, args.device)
            if images == 1:
                ours_pixels = load_file(os.path.join(args.dir, "ours_pixels.safetensors"))["pixels"]
                results["vq_max_abs_diff"] = float((pixels.cpu() - ours_pixels).abs().max())
                results["vq_pixels_mean_abs"] = float(pixels.abs().mean())
        n = settings["per_image_batch"]
        t[f"seconds_per_image_b{n}"], _ = median_time(
            lambda: ref.vq_decode(ref.generate_tokens(n, full)), 1, args.device
        )
        t[f"seconds_per_image_b{n}"] /= n

    ours = json.load(open(os.path.join(args.dir, "ours.json")))
    json.dump(results, open(os.path.join(args.dir, "reference.json"), "w"), indent=1)
    report(ours, results, settings, args)


def agreement(a, b):
    """Length of the common prefix, and the share of equal positions."""
    prefix = 0
    for x, y in zip(a, b):
        if x != y:
            break
        prefix += 1
    same = sum(x == y for x, y in zip(a, b)) / max(min(len(a), len(b)), 1)
    return prefix, same


def report(ours, ref, settings, args):
    rows = [
        ("understanding prefill ({} tokens), s".format(settings["prompt_tokens"]), "prefill_s", False),
    ]
    rows += [(f"understanding decode, batch {b}, tokens/s", f"decode_tokens_per_s_b{b}", True) for b in settings["decode_batches"]]
    rows += [(f"generation, {b} image(s), image tokens/s", f"image_tokens_per_s_b{b}", True) for b in settings["image_batches"]]
    rows += [(f"VQ decode, {b} image(s), s", f"vq_decode_s_b{b}", False) for b in settings["image_batches"]]
    n = settings["per_image_batch"]
    rows.append((f"seconds per image, {n} images, VQ decode included", f"seconds_per_image_b{n}", False))
    defaults = " (ours with candle's and glibc's default settings)" if settings.get("runtime_defaults") else ""
    print(f"\n{settings['description']}; {args.device} {args.dtype}, {settings['threads']} threads, "
          f"median of {settings['repeats']}; torch {torch.__version__}{defaults}\n")
    print("| task | ours | transformers | ours / transformers |")
    print("|---|---:|---:|---:|")
    for label, key, higher_is_better in rows:
        a, b = ours["timings"][key], ref["timings"][key]
        ratio = a / b if higher_is_better else b / a
        print(f"| {label} | {a:.4g} | {b:.4g} | {ratio:.2f}x |")
    print("\nRatios are speed: above 1.00x means ours is faster.\n")
    for task in ("answer", "image"):
        prefix, same = agreement(ours["greedy"][task], ref["greedy"][task])
        total = len(ours["greedy"][task])
        print(f"greedy {task} tokens: {prefix} of {total} agree before the first difference, {same:.0%} of positions equal")
    print(f"VQ decode of the same codes: largest pixel difference {ref['vq_max_abs_diff']:.2e} "
          f"(mean |pixel| {ref['vq_pixels_mean_abs']:.3f})")


if __name__ == "__main__":
    main()
