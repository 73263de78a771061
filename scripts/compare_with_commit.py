"""Check that a refactor changed no number: the shipped models' logits, caches, carried edits, generation,
prefix caches and a short SAE training run, computed by this working tree and by an earlier commit,
compared with ``torch.equal``.

    python -m scripts.compare_with_commit HEAD~1 --json results/bit-identity/issue-23.json

The earlier commit is checked out into a temporary git worktree; each tree runs in its own Python
process with that tree first on its path, on one CPU thread (so the two runs do the same arithmetic).
Exit status 1 when any tensor differs; the report names each one and its largest difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gdn-austen", "mamba2-austen")

# run in a child process whose first path entry is the tree under test; writes a dict of tensors
DUMP = r"""
import sys, tempfile, torch
tree, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
torch.set_num_threads(1)
import hooked_gdn
assert hooked_gdn.__file__.startswith(tree), hooked_gdn.__file__
from hooked_gdn.pretrained import austen_documents, austen_corpus
from writesae import BilinearMatrixSAE
from writesae.splice import load_model  # loads every family in both trees (before issue 23, Mamba-2 had its own class)
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

found = {}
text = austen_documents("heldout")[0].text[:3000]
for name in MODELS:
    torch.manual_seed(0)
    model = load_model(name)
    tokens = model.to_tokens(text)[:, :150]
    layer = model.cfg.gdn_layers[1]
    hook = f"blocks.{layer}.linear_attn."
    found[f"{name}/logits"] = model(tokens)
    _, cache = model.run_with_cache(tokens)
    found.update({f"{name}/cache/{k}": v for k, v in cache.items()})
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_state"), state_positions=[3, 70, 149])
    found.update({f"{name}/states/{k}": v for k, v in cache.items()})
    found[f"{name}/write_edit"] = model.run_with_hooks(tokens, fwd_hooks=[(hook + "hook_write_value", lambda x, hook: x * 0.5)])
    found[f"{name}/state_edit"] = model.run_with_hooks(tokens, fwd_hooks=[(hook + "hook_state", lambda s, hook: s + 0.1)],
                                                       state_positions=[90])
    found[f"{name}/sequential_edit"] = model.run_with_hooks(
        tokens[:, :40], fwd_hooks=[(hook + "hook_write_value", lambda x, hook: x * 0.5)], recurrence="sequential")
    found[f"{name}/generate"] = model.generate(tokens[:, :20], max_new_tokens=12, stop_at_eos=False)
    found[f"{name}/continued"] = model(tokens[:, 60:80], cache=model.prefill(tokens[:, :60]))
    corpus, heldout = austen_corpus()
    store = ActivationStore(model, corpus, StoreConfig(layer=layer, heads=[0, 1], context=64, positions=8, buffer_size=256,
                                                       model_batch_size=8, heldout_documents=heldout))
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=64, k=4, heads=[0, 1],
                            n_heads=model.cfg.n_value_heads, seed=0)
    with tempfile.TemporaryDirectory() as out_dir:
        trained = train(sae, store, TrainConfig(out_dir=out_dir, steps=20, batch_size=32, lr=1e-2, warmup_steps=3,
                                                eval_every=0, checkpoint_every=0, progress=False, input_scale_samples=128))
    found.update({f"{name}/sae/{k}": v for k, v in trained.sae.state_dict().items()})
torch.save(found, out)
"""


def dump(tree: Path, out: Path) -> None:
    code = f"MODELS = {MODELS!r}\n" + DUMP
    if subprocess.run([sys.executable, "-c", code, str(tree), str(out)], cwd=tempfile.gettempdir()).returncode:
        raise SystemExit(f"computing the numbers with the tree at {tree} failed (its traceback is above)")


def _working_tree() -> str:
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    head = git("rev-parse", "HEAD")
    return head if not git("status", "--porcelain", "--untracked-files=no") else f"{head} plus uncommitted changes"


def compare(ref: str) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), commit], cwd=ROOT, check=True, capture_output=True)
        try:
            dump(before, Path(scratch) / "before.pt")
            dump(ROOT, Path(scratch) / "after.pt")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True)
        a, b = torch.load(Path(scratch) / "before.pt"), torch.load(Path(scratch) / "after.pt")
    removed, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if removed:  # a new hook point adds names (compared from the next commit on); a lost one is a regression
        raise SystemExit(f"the working tree no longer computes: {removed}")
    differ = {k: float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    return {"command": " ".join(["python -m scripts.compare_with_commit", *sys.argv[1:]]), "before": commit,
            "after": _working_tree(),
            "models": list(MODELS), "tensors": len(a), "differ": differ, "added": added, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the earlier commit (any git revision)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = compare(args.ref)
    print(f"{report['tensors']} tensors compared, {len(report['differ'])} differ, {len(report['added'])} added "
          "(new names, not compared)")
    for name, largest in report["differ"].items():
        print(f"  {name}: largest difference {largest:.3g}")
    if args.json:
        from hooked_gdn.files import atomic_file

        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["differ"] else 0


if __name__ == "__main__":
    sys.exit(main())
