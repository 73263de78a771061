"""The GPU check (issue 28, item 5): parity with transformers on CUDA, P1–P2, SAE training throughput, in one run.

    python -m benchmarks.gpu_check                        # on a CUDA machine (parity and P1–P2: about 1 min on one H200)
    python -m benchmarks.gpu_check --device cpu --small   # the same code on small sizes, to test the script (< 1 min)
    python -m benchmarks.gpu_check --only parity,sae      # some sections only

Writes ``benchmarks/results/gpu_check.json`` (``--small`` runs write to a temp folder unless ``--out`` is given),
after every section, so that a run cut short keeps what it measured; with ``OUT`` set in the environment,
also ``$OUT/gpu_check.json``. ``benchmarks/RESULTS.md``'s GPU section is rendered from that file by
``python -m benchmarks.results_md`` (through `results_block` below), never copied by hand.

1. parity: for a tiny random model of each family (tests/conftest.py's and tests/test_mamba2.py's shapes:
   Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid, Mamba-2), saved by transformers and loaded by both
   libraries through ``from_pretrained``: the largest |logit difference|, ours against transformers, in fp32
   (odd length, a long sequence, one token, left padding) and in bf16 (over the largest |logit|); and
   chunked against sequential recurrence (``recurrence="sequential"``): logits and every cached state of
   every memory layer.
2. engine: P1 and P2 as `benchmarks.bench_engine` defines them (its functions, on the GPU; timing
   waits for the device), at Qwen3.5-0.8B's GDN sizes, and the same rows for a Mamba-2 with
   mamba2-370m's layer sizes (d_model 1024, 32 heads of 64, d_state 128). The TransformerLens column
   (P2c) is there when `benchmarks.tl_bridge` can boot the bridge on that model.
3. sae: `benchmarks.bench_sae`'s grid of training steps (the trainer's step: TopK, Adam; FlatSAE, MatrixSAE and
   BilinearMatrixSAE at d_k = d_v = 128, Qwen3.5-0.8B's, and 64, the shipped models', n_features 64–16384, batch
   32–1024; with ``--small`` its smallest shapes only), measured on the device by bench_sae's own functions: each
   step's states/s, FLOPs, matmul fraction, overhead, Adam alone and work bounds, each SAE's fixed cost, the plain
   step beside ours at the smallest shapes, and the decode routes side by side; issue 28's goals judged on them
   as `benchmarks.bench_sae.summary` judges the CPU's.

Everything runs in fp32 with TF32 off (matmuls and convolutions), so parity figures are fp32's and the
matmul reference is full fp32. A failing measurement is recorded under ``errors`` and the run goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "gpu_check.json"
SECTIONS = ("parity", "engine", "sae")  # the longest last (the SAE grid): a run cut short keeps the others
# Nothing is fetched: the GPU machines have no network, and transformers' hub kernels would be a download
# (set by main before the library and transformers are imported, unless the environment says otherwise).
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0"}
FP32_TOLERANCE = 1e-4  # the parity tests' bound on |logit difference| in fp32

# ------------------------------------------------------------------ importing the library where it is not installed


def _datasets_failed(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return (getattr(err, "name", None) or "").split(".")[0] == "datasets" or any(
        "datasets" in Path(frame.filename).parts for frame in frames)


def import_library() -> bool:
    """Import hooked_gdn and writesae. TransformerLens imports ``datasets`` at import time for helpers that
    nothing here calls; where ``datasets`` cannot be imported (a machine whose pyarrow or hub it does not
    fit), a stub with the names TransformerLens imports stands in. Returns whether the stub was needed."""
    try:
        import hooked_gdn  # noqa: F401
        import writesae  # noqa: F401
        return False
    except Exception as err:
        if not _datasets_failed(err):
            raise
        print(f"datasets does not import here ({type(err).__name__}: {err}); using a stub", flush=True)
    import importlib.machinery
    import types

    for name in list(sys.modules):
        if name.split(".")[0] in ("datasets", "transformer_lens", "hooked_gdn", "writesae"):
            del sys.modules[name]

    def load_dataset(*args, **kwargs):
        raise RuntimeError("datasets is a stub in benchmarks/gpu_check.py")

    stub = {"datasets": {"load_dataset": load_dataset, "Dataset": type("Dataset", (), {}),
                         "IterableDataset": type("IterableDataset", (), {})}}
    stub["datasets.arrow_dataset"] = {"Dataset": stub["datasets"]["Dataset"]}
    stub["datasets.iterable_dataset"] = {"IterableDataset": stub["datasets"]["IterableDataset"]}
    stub["datasets.load"] = {"load_dataset": load_dataset}
    for name, attrs in stub.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
    import hooked_gdn  # noqa: F401
    import writesae  # noqa: F401
    return True


# ------------------------------------------------------------------ bookkeeping


class Run:
    """The results dict, its file(s), and the errors met on the way."""

    def __init__(self, out: Path, record: dict):
        self.out, self.start = out, time.perf_counter()
        self.results = {"provenance": record, "seconds": 0.0, "errors": []}

    def attempt(self, where: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None with the error recorded under ``where``."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a one-shot run records a failure and goes on
            print(f"ERROR in {where}:\n{traceback.format_exc()}", flush=True)
            self.results["errors"].append({"where": where, "error": f"{type(err).__name__}: {err}"[:2000]})
            return None
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self) -> None:
        self.results["seconds"] = round(self.elapsed(), 1)
        text = json.dumps(self.results, indent=2, default=float) + "\n"
        targets = [self.out] + ([Path(os.environ["OUT"]) / "gpu_check.json"] if os.environ.get("OUT") else [])
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """SHA-256 of the library and benchmark sources (hooked_gdn, writesae, benchmarks: every .py, by path):
    the code a run measured, where the machine has no git to name a commit (compare with a checkout's)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(f for package in ("hooked_gdn", "writesae", "benchmarks") for f in (ROOT / package).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def provenance(args, device: torch.device, datasets_stub: bool) -> dict:
    from benchmarks.provenance import provenance as run_provenance  # after `import_library`: it imports hooked_gdn

    record = run_provenance("gpu_check", seed=args.seed, small=args.small, device_type=device.type,
                            device=platform.processor() or platform.machine(), git_commit=_git_commit(),
                            source_sha256=source_digest(), fp32_matmul_precision=torch.get_float32_matmul_precision(),
                            tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
                            datasets_stub=datasets_stub)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record |= {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                   "device_memory_gib": round(props.total_memory / 2**30, 1)}
    return record


# ------------------------------------------------------------------ 1. parity on the device

_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=8,
            num_hidden_layers=4)
_EXPERTS = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
_BASE = dict(vocab_size=101, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=0)
_ROPE = dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
FAMILIES = {  # name -> (transformers config class, causal-LM class, keywords): the tests' tiny shapes
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _BASE | _ROPE | _GDN | dict(intermediate_size=64, tie_word_embeddings=False)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", _BASE | _ROPE | _GDN | _EXPERTS),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   _BASE | _ROPE | _GDN | _EXPERTS | dict(intermediate_size=64, mlp_only_layers=[1], norm_topk_prob=False)),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", _BASE | _GDN | dict(intermediate_size=64)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        vocab_size=101, expand=2, chunk_size=8, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
        num_heads=4, head_dim=8, state_size=6, n_groups=2, hidden_size=16, num_hidden_layers=2, use_bias=True)),
}


def _randomize_(model: torch.nn.Module, family: str, seed: int) -> None:
    """Move the weights off their initialisation where it would hide a difference (tests/conftest.py's
    randomize_: norms, A_log, dt_bias, decisive MoE routers; Mamba-2: every weight, as tests/test_mamba2.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family == "mamba2":
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name or name.endswith(("A_log", "dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.mul_(50.0)


def _ours_class(family: str):
    from hooked_gdn import HookedGatedDeltaNet, HookedMamba2

    return HookedMamba2 if family == "mamba2" else HookedGatedDeltaNet


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _logits(ours, theirs, cases: dict, padded: torch.Tensor, mask: torch.Tensor) -> dict:
    """name -> (our logits, transformers' logits) for every input (only the real positions of the padded one)."""
    got = {name: (ours(x), theirs(x).logits) for name, x in cases.items()}
    got["left_padded_3x45"] = (ours(padded, attention_mask=mask)[mask.bool()],
                               theirs(padded, attention_mask=mask).logits[mask.bool()])
    return got


def _chunked_vs_sequential(ours, x: torch.Tensor) -> dict:
    """Logits and every state of every memory layer, chunked (the default) against sequential recurrence."""
    from hooked_gdn.sites import site_name

    sites = [site_name(layer, "state") for layer in ours.cfg.gdn_layers]
    par_logits, par = ours.run_with_cache(x, names_filter=sites)
    seq_logits, seq = ours.run_with_cache(x, names_filter=sites, recurrence="sequential")
    return {"tokens": x.shape[-1], "logits_max_abs_diff": _max_abs(par_logits, seq_logits),
            "states_max_abs_diff": max(_max_abs(par[s], seq[s]) for s in sites),
            "states_max_abs": max(seq[s].abs().max().item() for s in sites)}


def parity_family(run: Run, family: str, device: torch.device, seed: int, long: int) -> dict:
    """One family's figures; each part (fp32, chunked vs sequential, bf16) on its own, so that one failing
    leaves the others."""
    import transformers

    config_name, lm_name, keywords = FAMILIES[family]
    if not hasattr(transformers, lm_name):
        return {"skipped": f"transformers {transformers.__version__} has no {lm_name}"}
    lm = getattr(transformers, lm_name)
    torch.manual_seed(seed)
    hf = lm(getattr(transformers, config_name)(**keywords)).eval()
    _randomize_(hf, family, seed)
    g = torch.Generator().manual_seed(seed)
    vocab = keywords["vocab_size"]
    cases = {"2x37": torch.randint(2, vocab, (2, 37), generator=g), f"1x{long}": torch.randint(2, vocab, (1, long), generator=g),
             "1x1": torch.randint(2, vocab, (1, 1), generator=g)}
    padded = torch.randint(2, vocab, (3, 45), generator=g)
    mask = torch.ones_like(padded)
    mask[0, :7] = 0
    mask[2, :30] = 0
    cases, padded, mask = {k: v.to(device) for k, v in cases.items()}, padded.to(device), mask.to(device)
    out: dict = {}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        hf.save_pretrained(folder)
        del hf

        def pair(dtype):
            return (_ours_class(family).from_pretrained(folder, device=str(device), dtype=dtype).eval(),
                    lm.from_pretrained(folder, dtype=dtype).to(device).eval())

        ours, theirs = pair(torch.float32)
        fp32 = run.attempt(f"parity/{family}/fp32", _logits, ours, theirs, cases, padded, mask)
        if fp32 is not None:
            out["fp32_max_abs_diff"] = {name: _max_abs(a, b) for name, (a, b) in fp32.items()}
            out["fp32_max_abs_logit"] = max(b.abs().max().item() for _, b in fp32.values())
            out["fp32_within_tolerance"] = max(out["fp32_max_abs_diff"].values()) <= FP32_TOLERANCE
        out["chunked_vs_sequential"] = run.attempt(f"parity/{family}/chunked_vs_sequential", _chunked_vs_sequential,
                                                   ours, cases[f"1x{long}"])
        del ours, theirs
        bf16 = run.attempt(f"parity/{family}/bf16", lambda: _logits(*pair(torch.bfloat16), cases, padded, mask))
        if bf16 is not None and fp32 is not None:
            scale = out["fp32_max_abs_logit"]
            out["bf16_max_abs_diff_over_max_logit"] = max(_max_abs(a, b) for a, b in bf16.values()) / scale
            out["bf16_ours_vs_fp32_over_max_logit"] = max(_max_abs(a, fp32[name][1]) for name, (a, _) in bf16.items()) / scale
    return out


def run_parity(run: Run, device: torch.device, args) -> None:
    section = run.results.setdefault("parity", {"tolerance_fp32": FP32_TOLERANCE, "families": {}})
    for family in FAMILIES:
        start = time.perf_counter()
        result = run.attempt(f"parity/{family}", parity_family, run, family, device, args.seed, 60 if args.small else 1000)
        if result is not None:
            section["families"][family] = result | {"seconds": round(time.perf_counter() - start, 2)}
            print(f"parity {family}: {json.dumps(result)}", flush=True)
        run.write()


# ------------------------------------------------------------------ 2. P1–P2 (benchmarks/bench_engine.py's definitions)


def _rows(rows: list[tuple]) -> list[dict]:
    return [dict(zip(("id", "measure", "ratio", "target", "detail"), row)) for row in rows]


# --small: the same code on a model small enough for a CPU (sizes of bench_engine's config / of the Mamba-2 below)
SMALL_GDN = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32)
SMALL_MAMBA2 = dict(hidden_size=128, num_heads=8, head_dim=32, state_size=32)


def _mamba2_models(layers: int, **sizes):
    """A random Mamba-2 with mamba2-370m's layer sizes (``sizes`` overrides them) and ``layers`` layers
    (vocabulary 4096, as P1–P2 draw their tokens), saved by transformers and loaded by both libraries."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from hooked_gdn import HookedMamba2

    config = Mamba2Config(**dict(vocab_size=4096, hidden_size=1024, num_heads=32, head_dim=64, state_size=128, n_groups=1,
                                 expand=2, num_hidden_layers=layers, chunk_size=256, tie_word_embeddings=False) | sizes)
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = HookedMamba2.from_pretrained(folder).eval()
    return hf, ours


def engine_model(run: Run, kind: str, device: torch.device, args) -> dict:
    """P1–P2 of one model at each of ``args.lengths`` (a length is skipped once the run is past ``args.budget``)."""
    from benchmarks import bench_engine

    layers = 4  # bench_engine's default: 3 GDN layers and 1 attention layer (transformers' Qwen3.5 needs one)
    if kind == "gdn":
        hf, ours = bench_engine.models(layers, **(SMALL_GDN if args.small else {}))
    else:
        hf, ours = _mamba2_models(layers, **(SMALL_MAMBA2 if args.small else {}))
    hf, ours = hf.to(device), ours.to(device)
    repeats = 2 if args.small else 7
    result = {"setup": {"layers": layers, "repeats": repeats, "dtype": "float32", "batch": 1, "d_model": ours.cfg.d_model,
                        "n_value_heads": ours.cfg.n_value_heads, "d_key": ours.cfg.d_key, "d_value": ours.cfg.d_value,
                        "memory_layers": list(ours.cfg.gdn_layers)},
              "by_length": {}}
    for i, T in enumerate(args.lengths):
        if i and run.elapsed() > args.budget:
            result["by_length"][str(T)] = {"skipped": f"the run was past its {args.budget:.0f} s budget"}
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            rows = bench_engine.p1(hf, ours, repeats, T=T) + bench_engine.p2(hf, ours, repeats, T=T)
        entry = {"rows": _rows(rows)}
        if device.type == "cuda":
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["by_length"][str(T)] = entry
        for rid, what, ratio, target, detail in rows:
            print(f"{kind} T={T} | {rid} | {what} | {ratio:.2f} | {target} | {detail} |", flush=True)
    return result


def run_engine(run: Run, device: torch.device, args) -> None:
    section = run.results.setdefault("engine", {})
    for kind in ("gdn", "mamba2"):
        result = run.attempt(f"engine/{kind}", engine_model, run, kind, device, args)
        if result is not None:
            section[kind] = result
        run.write()


# ------------------------------------------------------------------ 3. SAE training (benchmarks/bench_sae.py's step)


def run_sae(run: Run, device: torch.device, args) -> None:
    """`benchmarks.bench_sae`'s grid of training steps (with ``--small``, its smallest shapes only), each SAE's fixed
    cost, the plain step beside ours at the smallest shapes and the decode routes side by side, measured on ``device``
    by bench_sae's own functions, so that issue 28's goals are judged there as on the CPU (`bench_sae.summary`)."""
    from benchmarks import bench_sae as b
    from writesae.host_memory import freed_memory_kept

    repeats = args.sae_repeats or (2 if args.small else b.REPEATS)
    fixed_cost_repeats = args.fixed_cost_repeats or (3 if args.small else b.FIXED_COST_REPEATS)
    n_features, batches = ((min(b.N_FEATURES),), (min(b.BATCHES),)) if args.small else (b.N_FEATURES, b.BATCHES)
    decode = [r for r in b.DECODE_ROWS if r[3] == min(b.BATCHES) and r[2] <= 2 * b.K] if args.small else b.DECODE_ROWS
    section = run.results.setdefault("sae", {"k": b.K, "dtype": "float32", "optimiser": "Adam", "repeats": repeats,
                                             "fixed_cost_repeats": fixed_cost_repeats,
                                             "matmul_reference_trials": b.MATMUL_REFERENCE_TRIALS, "rules": b.rule_constants(),
                                             "rows": [], "fixed_cost": [], "plain_step": [], "decode": []})

    def measured(key: str, where: str, fn, *fn_args) -> None:
        row = run.attempt(f"sae/{where}", fn, *fn_args)
        if row is not None:
            print(json.dumps(row), flush=True)
            section[key].append(row)
            if key == "rows":  # the verdict on the steps so far: a run cut short keeps one that fits its rows
                section["summary"] = b.summary(section["rows"])
        run.write()

    with freed_memory_kept():  # the trainer's steps run inside it (writesae.train.train)
        for architecture, shape, n, batch in itertools.product(b.CLASSES, b.HEAD_SHAPES, n_features, batches):
            measured("rows", f"{architecture}/{shape}/n{n}/batch{batch}", b.step_row, architecture, shape, n, batch,
                     repeats, device)
        for row in filter(b.at_smallest_shapes, section["rows"]):
            measured("plain_step", f"plain/{row['architecture']}/{row['head_shape']}", b.plain_step_row, row,
                     fixed_cost_repeats, device)
        for architecture in b.CLASSES:
            measured("fixed_cost", f"fixed/{architecture}", b.fixed_cost_row, architecture, fixed_cost_repeats, device)
        for architecture, d, n, batch, k in decode:
            measured("decode", f"decode/{architecture}/d{d}/n{n}/batch{batch}/k{k}", b.decode_row, architecture, d, n,
                     batch, repeats, k, device)


# ------------------------------------------------------------------ the RESULTS.md section


def _g(x: float) -> str:
    return f"{x:.1e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.3g}"


def results_block(results: dict | None) -> str:
    """benchmarks/RESULTS.md's GPU section, from gpu_check.json's contents (None: not run yet)."""
    command = "`python -m benchmarks.gpu_check`"
    if results is None:
        return (f"Not yet run on a GPU. {command} measures parity with transformers on CUDA, P1–P2 and SAE "
                "training states/s against a plain matmul; it writes `benchmarks/results/gpu_check.json`, from which "
                "`python -m benchmarks.results_md` renders this section.\n")
    p = results["provenance"]
    lines = []
    if p.get("device_type") != "cuda" or p.get("small"):
        lines += [f"**Not a GPU measurement**: this file comes from a test run (`{p['command']}`, device "
                  f"{p.get('device_type')}{', --small' if p.get('small') else ''}).", ""]
    tf32 = "off" if not any(p.get("tf32", {}).values()) else f"on ({p['tf32']})"
    lines += [f"`{p['command']}` on {p['device']} ({p.get('date', '?')}; torch {p['torch']}"
              f"{', CUDA ' + p['cuda'] if p.get('cuda') else ''}, transformers {p['transformers']}, TransformerLens "
              f"{p['transformer_lens']}; fp32, TF32 {tf32}; {p['cpu_threads']} CPU threads; "
              f"{results['seconds'] + p.get('import_seconds', 0):.0f} s for the whole run; "
              f"{'commit ' + p['git_commit'][:12] if p.get('git_commit') else 'sources'} "
              f"{'and sources ' if p.get('git_commit') else ''}sha256 {p.get('source_sha256', '?')[:12]}), "
              "`benchmarks/results/gpu_check.json`.", ""]
    families = results.get("parity", {}).get("families", {})
    if families:
        tol = results["parity"]["tolerance_fp32"]
        lines += ["Parity with transformers on the device (tiny random models of each family, saved by transformers, "
                  f"loaded by both; fp32 target ≤ {tol:g}):", "",
                  "| family | fp32 max abs logit diff: 2×37, long, 1 token, left-padded | bf16 vs transformers bf16 "
                  "(÷ max abs logit) | chunked vs sequential: logits, states (÷ max abs state) |",
                  "|---|---|---|---|"]
        for name, f in families.items():
            if "skipped" in f:
                lines.append(f"| {name} | skipped: {f['skipped']} | | |")
                continue
            fp32, cs = "failed", f.get("chunked_vs_sequential")
            if "fp32_max_abs_diff" in f:
                fp32 = ", ".join(_g(v) for v in f["fp32_max_abs_diff"].values())
                fp32 += "" if f["fp32_within_tolerance"] else " **(above target)**"
            bf16 = _g(f["bf16_max_abs_diff_over_max_logit"]) if "bf16_max_abs_diff_over_max_logit" in f else "failed"
            cs = (f"{_g(cs['logits_max_abs_diff'])}, {_g(cs['states_max_abs_diff'] / cs['states_max_abs'])} "
                  f"(T = {cs['tokens']})") if cs else "failed"
            lines.append(f"| {name} | {fp32} | {bf16} | {cs} |")
        lines.append("")
    for kind, title in (("gdn", "GDN at Qwen3.5-0.8B's sizes"), ("mamba2", "Mamba-2 at mamba2-370m's layer sizes")):
        model = results.get("engine", {}).get(kind)
        if not model:
            continue
        title = title.split(" at ")[0] + ", --small sizes" if p.get("small") else title
        s = model["setup"]
        lines += [f"P1–P2 as `benchmarks.bench_engine` defines them ({title}: d_model {s['d_model']}, "
                  f"{s['n_value_heads']} heads of d_k {s['d_key']} × d_v {s['d_value']}, {s['layers']} layers, "
                  f"batch {s['batch']}; medians of {s['repeats']} interleaved repeats, each timed to the device's "
                  "completion):", "", "| T | id | measure | ratio | target | times |", "|---|---|---|---|---|---|"]
        peer = False
        for T, entry in model["by_length"].items():
            if "skipped" in entry:
                lines.append(f"| {T} | | skipped: {entry['skipped']} | | | |")
                continue
            lines += [f"| {T} | {r['id']} | {r['measure']} | {r['ratio']:.2f} | {r['target']} | {r['detail']} |"
                      for r in entry["rows"]]
            peer |= any(r["id"] == "P2c" for r in entry["rows"])
        if not peer:
            lines += ["", "No TransformerLens column: `benchmarks.tl_bridge` could not boot its bridge with a state "
                          "scan on this model."]
        lines.append("")
    if results.get("sae", {}).get("rows"):
        lines += _sae_lines(results["sae"])
    lines += _reading(results)
    if results.get("errors"):
        lines += ["Failed measurements (see the JSON for the messages): "
                  + ", ".join(f"`{e['where']}`" for e in results["errors"]) + ".", ""]
    return "\n".join(lines)


def sae_rows(section: dict) -> list[dict]:
    """A results file's SAE step rows, keyed as `benchmarks.bench_sae.step_row` keys them: a run of this script since
    it measures by bench_sae's functions wrote them so (its section records the rules' constants from the start, even
    where the run was cut short); an earlier run named each SAE by its class and gave seconds and FLOP/s, which are
    renamed and scaled here (the numbers measured then, nothing recomputed)."""
    if "rules" in section:
        return section["rows"]
    from benchmarks.bench_sae import CLASSES

    names = {cls.__name__: name for name, cls in CLASSES.items()}
    return [{"architecture": names[r["architecture"]], **{key: r[key] for key in ("d_k", "d_v", "n_features", "batch", "k")},
             "step_ms": 1e3 * r["step_s"], "states_per_s": r["states_per_s"], "step_gflop": r["step_flops"] / 1e9,
             "gflop_per_s": r["achieved_flops_per_s"] / 1e9, "matmul_gflop_per_s": r["matmul_flops_per_s"] / 1e9,
             "matmul_fraction": r["ratio_to_matmul"], "overhead_ms": 1e3 * r["overhead_s"]} for r in section["rows"]]


def _sae_lines(s: dict) -> list[str]:
    """The SAE section: `benchmarks.bench_sae`'s grid, goals, plain step and decode routes as it renders its own (a run
    of this script since it measures them by bench_sae's functions), or the earlier check's rows (a run before it
    did), whose columns it renders as they are."""
    from benchmarks.bench_sae import GOAL_MATMUL_FRACTION, decode_routes_lines, grid_definitions, grid_lines

    if "rules" in s:
        return [f"SAE training steps as `benchmarks.bench_sae` measures them, on the device (its grid; TopK k = {s['k']}, "
                f"{s['optimiser']}, {s['dtype']}, one head; medians of {s['repeats']} repeats, each timed to the device's "
                f"completion). {grid_definitions(s['matmul_reference_trials'])}", "",
                *grid_lines(s, s["fixed_cost_repeats"]), "",
                *([*decode_routes_lines(s["decode"], s["rules"]), ""] if s["decode"] else [])]
    rows = sae_rows(s)
    good = [r for r in rows if r["matmul_fraction"] >= GOAL_MATMUL_FRACTION]
    rest = [r for r in rows if r not in good]
    return [f"SAE training steps as an earlier version of this script measured them (TopK k = {s['k']}, sparse decode, "
            f"{s['optimiser']}, {s['dtype']}, one head; FLOPs as torch's FlopCounterMode counts them: matrix products "
            "only), against one square `torch.matmul` of the same FLOPs timed in the same run; overhead: the step's "
            "time beyond its FLOPs at that matmul's rate. It measured neither `benchmarks.bench_sae`'s whole grid nor "
            "its bounds, plain step or routes, which this script now does:", "",
            "| SAE | head | n | batch | states/s | GFLOP/step | TFLOP/s | matmul TFLOP/s | matmul fraction | overhead ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {r['architecture']} | {r['d_k']}×{r['d_v']} | {r['n_features']} | {r['batch']} | {r['states_per_s']:.0f} | "
              f"{r['step_gflop']:.3g} | {r['gflop_per_s'] / 1e3:.3g} | {r['matmul_gflop_per_s'] / 1e3:.3g} | "
              f"{r['matmul_fraction']:.2f} | {r['overhead_ms']:.2g} |" for r in rows], "",
            f"SAE steps at ≥ {GOAL_MATMUL_FRACTION} of the matmul rate: "
            + (", ".join(f"{r['architecture']} {r['d_k']}×{r['d_v']} n = {r['n_features']} batch {r['batch']} "
                         f"({r['matmul_fraction']:.2f})" for r in good) or "none")
            + (f"; the other {len(rest)} run at {_span([r['matmul_fraction'] for r in rest])} of it" if rest else "")
            + f"; overhead {_span([r['overhead_ms'] for r in rows], '.1f')} ms a step (generated from the file).", ""]


def _span(values: list[float], fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}"


def _reading(results: dict) -> list[str]:
    """The engine's key comparisons as sentences, generated from the same file as its tables."""
    lines = []
    for kind, title in (("gdn", "GDN"), ("mamba2", "Mamba-2")):
        rows = [r for entry in results.get("engine", {}).get(kind, {}).get("by_length", {}).values()
                for r in entry.get("rows", [])]
        by_id = {i: [r for r in rows if r["id"] == i] for i in ("P1", "P2a", "P2b", "P2c")}
        if not all(by_id.values()):
            continue
        p2b_met = [r for r in by_id["P2b"] if round(r["ratio"], 2) <= float(r["target"].split()[1])]
        p1 = [r["ratio"] for r in by_id["P1"]]
        p1_side = ("below 1: our forward is faster than transformers'" if max(p1) < 1 else
                   "above 1: our forward is slower than transformers'" if min(p1) > 1 else "either side of 1")
        lines.append(f"- {title}: P1 {_span(p1)} ({p1_side}); P2b {_span([r['ratio'] for r in by_id['P2b']])} against a target of "
                     f"{by_id['P2b'][0]['target']} ({'met' if len(p2b_met) == len(by_id['P2b']) else 'missed'} "
                     f"{'everywhere' if len(p2b_met) in (0, len(by_id['P2b'])) else 'at some lengths'}); the per-token "
                     f"scan takes {_span([r['ratio'] for r in by_id['P2a']])}× ours (P2a) and the TransformerLens "
                     f"bridge's eager scan {_span([r['ratio'] for r in by_id['P2c']])}× (P2c).")
    return ["Reading them (generated from the file):", "", *lines, ""] if lines else []


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small sizes, to test the script (on a CPU: < 1 min)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", default=None, help="P1–P2 sequence lengths (default 512,2048; 64 with --small)")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds into the run after which P1–P2 skip their longer lengths (default 240)")
    parser.add_argument("--sae-repeats", type=int, default=None,
                        help="timed calls per SAE step and route (default benchmarks.bench_sae's, 5; 2 with --small)")
    parser.add_argument("--fixed-cost-repeats", type=int, default=None,
                        help="timed calls per step at the trivial and smallest shapes (default bench_sae's "
                             "FIXED_COST_REPEATS; 3 with --small)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default {RESULTS_JSON.relative_to(ROOT)}; a temp file with --small)")
    args = parser.parse_args()
    wanted = [s for s in args.only.split(",") if s]
    if unknown := set(wanted) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.lengths = [int(t) for t in (args.lengths or ("64" if args.small else "512,2048")).split(",")]
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check.small.json" if args.small else RESULTS_JSON)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; use --device cpu --small to test the script")
    # fp32 as fp32: no TF32 in matmuls or convolutions (parity in fp32, and the matmul reference's precision)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    start = time.perf_counter()
    datasets_stub = import_library()
    import_seconds = time.perf_counter() - start
    print(f"imports: {import_seconds:.1f} s", flush=True)
    run = Run(out, provenance(args, device, datasets_stub) | {"import_seconds": round(import_seconds, 1)})
    print(json.dumps(run.results["provenance"], indent=1), flush=True)
    for name in wanted:
        section_start = time.perf_counter()
        run.attempt(name, {"parity": run_parity, "engine": run_engine, "sae": run_sae}[name], run, device, args)
        run.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - section_start, 1)
        run.write()
        print(f"== {name}: {time.perf_counter() - section_start:.1f} s", flush=True)
    print(f"\n{results_block(run.results)}")
    print(f"wrote {out}" + (f" and {os.environ['OUT']}/gpu_check.json" if os.environ.get("OUT") else ""))


if __name__ == "__main__":
    main()
