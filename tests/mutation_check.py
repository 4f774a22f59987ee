"""Mutation check (issue #15, not part of CI): breaks the science and the platform on purpose, one break at a time,
runs only the tests that should notice, and prints which breaks were caught. Exits 1 when one was missed.

    .venv/bin/python tests/mutation_check.py                # a fresh git worktree of HEAD, removed afterwards
    .venv/bin/python tests/mutation_check.py --tree /tmp/m  # an existing worktree (e.g. with uncommitted tests)
    .venv/bin/python tests/mutation_check.py --only ema-decay-swapped --only no-ste-gate

It edits source files, so it never runs in the checkout it was called from unless that is given as --tree: each
break is an exact text substitution that must match once (the check stops when the source has moved), and the file
is restored in a `finally`. Before the breaks, every selection of tests is run once unbroken and must pass, so a
"caught" means the break and nothing else failed them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files or node ids, run with -x -q
    k: str | None = None  # pytest -k expression

    def selection(self) -> tuple[tuple[str, ...], str | None]:
        return self.tests, self.k


CHUNKING = "dcdit/models/chunking.py"
OBJECTIVE = "dcdit/objective.py"
STEP = "platform/dcdit_platform/training/step.py"
T_CHUNKING = ("tests/dcdit/test_chunking.py",)
T_OBJECTIVE = ("tests/dcdit/test_objective.py",)
T_STEP = ("tests/platform/training/test_step.py",)

MUTATIONS = (
    # --- DC-DiT's router and chunking (dcdit/models/chunking.py) ---
    Mutation("no-ste-gate", CHUNKING,
             "gate = straight_through_one(torch.where(router_mask, probs, 1 - probs))",
             "gate = torch.ones_like(probs)", T_CHUNKING, "gate or router_gradient"),
    Mutation("ste-gate-kept-and-dropped-swapped", CHUNKING,
             "torch.where(router_mask, probs, 1 - probs)", "torch.where(router_mask, 1 - probs, probs)",
             T_CHUNKING, "gate or router_gradient"),
    Mutation("ste-gate-gradient-halved", CHUNKING,
             "gate = straight_through_one(torch.where(router_mask, probs, 1 - probs))",
             "gate = straight_through_one(0.5 * torch.where(router_mask, probs, 1 - probs))", T_CHUNKING,
             "gate or router_gradient"),
    Mutation("tail-drop-keeps-the-lowest-p", CHUNKING,
             "scores = torch.where(mask, probs.detach(),", "scores = torch.where(mask, -probs.detach(),",
             T_CHUNKING + T_OBJECTIVE, "tail_drop"),
    Mutation("dechunk-smoothing-off", CHUNKING,
             "out = pp[..., None] * hp + (1 - pp[..., None]) * smoothed", "out = hp",
             T_CHUNKING, "dechunk"),
    Mutation("plug-back-takes-the-farther-column", CHUNKING,
             "torch.where(cols - left <= right - cols, left, right)",
             "torch.where(cols - left <= right - cols, right, left)", T_CHUNKING, "plug_back"),
    Mutation("ratio-loss-uses-p-for-the-hard-ratio", CHUNKING,
             "(n - 1) * r * p_bar", "(n - 1) * p_bar * p_bar", T_CHUNKING, "ratio_loss"),
    # --- The training objective (dcdit/objective.py) ---
    Mutation("ratio-loss-dropped", OBJECTIVE,
             "loss = diffusion_loss + self.chunking.ratio_loss_weight * r_loss", "loss = diffusion_loss",
             T_OBJECTIVE, None),
    Mutation("per-sample-seeds-per-micro-batch-again", OBJECTIVE,
             "per_sample_generators([sample_seed(seed, step, first + i)",
             "per_sample_generators([sample_seed(seed, step, i)",
             T_OBJECTIVE + T_STEP, "own_key or noises or split"),
    Mutation("class-dropout-off", OBJECTIVE,
             "drop=(u < class_dropout_prob)", "drop=(u < 0)", T_OBJECTIVE, "class_dropout"),
    Mutation("curriculum-off", OBJECTIVE,
             "return float(config.curriculum_start + frac * (final_n - config.curriculum_start))",
             "return float(final_n)", T_OBJECTIVE, "curriculum"),
    Mutation("multi-budget-never-drops", OBJECTIVE,
             "return random.Random(seed * 1_000_003 + step).choice(config.budget_fractions)", "return 0.0",
             T_OBJECTIVE, "multi_budget"),
    Mutation("multi-budget-warm-up-ignored", OBJECTIVE,
             "if not config.multi_budget or step < config.budget_warmup_steps:", "if not config.multi_budget:",
             T_OBJECTIVE, "multi_budget"),
    Mutation("forced-label-dropout-ignored", "dcdit/models/dit.py",
             "drop = force_drop_ids == 1", "drop = torch.zeros_like(labels, dtype=torch.bool)",
             T_OBJECTIVE, "class_dropout"),
    Mutation("q-sample-scales-swapped", "dcdit/diffusion/gaussian.py",
             "signal = extract(self.sqrt_alphas_cumprod, t, x0) * x0",
             "signal = extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0",
             ("tests/dcdit/test_diffusion.py",), "q_sample"),
    # --- Sampling, guidance, distillation, metrics ---
    Mutation("cfg-on-all-channels", "dcdit/diffusion/guidance.py",
             "g = channels if guided_channels is None else min(guided_channels, channels)", "g = channels",
             ("tests/dcdit/test_guidance.py",), None),
    Mutation("generation-seeds-per-batch", "dcdit/generate.py",
             "sample_seed(plan.seed, int(i)) for i in indices", "sample_seed(plan.seed, j) for j, i in enumerate(indices)",
             ("tests/dcdit/test_generate.py",), "batch"),
    Mutation("distillation-loss-l1", "dcdit/distill.py",
             "F.mse_loss(out.float(), target.float())", "F.l1_loss(out.float(), target.float())",
             ("tests/dcdit/test_upcycle.py",), "distill"),
    Mutation("fid-cross-term-halved", "dcdit/metrics.py",
             "np.trace(b.sigma) - 2.0 * cross", "np.trace(b.sigma) - cross",
             ("tests/dcdit/test_metrics.py",), "frechet or fid"),
    # --- The training step (platform/dcdit_platform/training/step.py, state.py) ---
    Mutation("ema-decay-swapped", STEP,
             "torch._foreach_lerp_(ema_params, params, 1.0 - decay)",
             "torch._foreach_lerp_(ema_params, params, decay)", T_STEP, "ema"),
    Mutation("lr-warm-up-off", STEP,
             "return t.lr * min(1.0, step / t.warmup_steps) if t.warmup_steps else t.lr", "return t.lr",
             T_STEP, "lr or warm"),
    Mutation("non-finite-gradient-steps-anyway", STEP,
             "if not math.isfinite(grad_norm):", "if False:", T_STEP, "non_finite"),
    Mutation("router-grad-norm-over-all-parameters", STEP,
             "family_of(config.model).router_parameters(model)", "model.parameters()", T_STEP, "router_grad_norm"),
    Mutation("kept-fraction-logged-before-tail-drop", "platform/dcdit_platform/training/metrics.py",
             '"router/kept_fraction": kept / max(grid, 1.0)', '"router/kept_fraction": router_kept / max(grid, 1.0)',
             ("tests/platform/training/test_metrics.py",), "routed_window"),
    Mutation("train-loss-averaged-per-step-not-per-sample", "platform/dcdit_platform/training/metrics.py",
             '"train/loss": s["loss"] / n', '"train/loss": s["loss"] / max(self.steps, 1)',
             ("tests/platform/training/test_metrics.py",), "routed_window or without_a_router"),
    Mutation("resume-skips-the-optimizer-state", "platform/dcdit_platform/training/state.py",
             "optimizer.load_state_dict(ckpt.optimizer_state)", "pass",
             ("tests/platform/training/test_train_local.py",), "stop_at_8"),
    Mutation("resume-restarts-the-ema-from-the-model", "platform/dcdit_platform/training/state.py",
             "ema.load_state_dict(ckpt.ema_state)", "pass",
             ("tests/platform/training/test_train_local.py",), "stop_at_8"),
    Mutation("resume-restarts-the-data-order", "platform/dcdit_platform/training/worker.py",
             'ckpt.state.get("data_cursor") if ckpt else None', "None",
             ("tests/platform/training/test_train_local.py",), "stop_at_8"),
    # --- Evaluation and secrets ---
    Mutation("evaluator-on-model-not-ema", "platform/dcdit_platform/runs.py",
             "(ckpt.ema_state, True) if ckpt.ema_state is not None", "(ckpt.model_state, True) if ckpt.ema_state "
             "is not None", ("tests/platform/test_runs.py",), "ema"),
    Mutation("redaction-off", "platform/dcdit_platform/secrets.py",
             "    text = str(text)\n    text = _URI_CREDENTIALS.sub", "    return str(text)\n    text = "
             "_URI_CREDENTIALS.sub", ("tests/platform/test_tracking.py",), "redaction"),
)


def pytest_run(tree: Path, tests: tuple[str, ...], k: str | None) -> tuple[int, str]:
    """pytest -x -q on `tests` in `tree` with the tree's packages first on the path; (exit code, output tail)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "platform")]),
               PYTHONDONTWRITEBYTECODE="1")  # never leave a broken module's bytecode behind
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if k:
        cmd += ["-k", k]
    proc = subprocess.run(cmd, check=False, cwd=tree, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, (lines[-1] if lines else "")


def union_selections(mutations: list[Mutation]) -> list[tuple[tuple[str, ...], str]]:
    """Every mutation's tests in as few pytest calls as possible (one interpreter start instead of one per
    selection): -k matches a module's name too, so "(test_step and (ema))" selects test_step.py's EMA tests. Files
    of the same name (tests/dcdit/test_metrics.py, tests/platform/training/test_metrics.py) go to separate calls,
    since pytest cannot import both in one. A call may select a few more tests than the mutations do, which only
    makes the unbroken run stricter."""
    groups: list[tuple[dict, dict]] = []  # ({file: None}, {-k term: None}) per call
    for m in mutations:
        for test in m.tests:
            stem = Path(test.split("::")[0]).stem
            group = next((g for g in groups if test in g[0] or all(Path(f).stem != stem for f in g[0])), None)
            if group is None:
                group = ({}, {})
                groups.append(group)
            files, terms = group
            files[test] = None
            terms[f"({stem} and ({m.k}))" if m.k else stem] = None
    return [(tuple(files), " or ".join(terms)) for files, terms in groups]


def is_main_checkout(tree: Path) -> bool:
    """Whether `tree` is a repository's main working tree (its git dir is the common one), not a worktree."""
    def git(*args: str) -> Path:
        out = subprocess.run(["git", "rev-parse", *args], cwd=tree, check=True, capture_output=True, text=True)
        return (tree / out.stdout.strip()).resolve()
    return git("--git-dir") == git("--git-common-dir")


def apply(tree: Path, m: Mutation) -> str:
    """Write the mutated file; the original text is returned for the restore."""
    path = tree / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        sys.exit(f"mutation {m.name}: the text to replace occurs {count} times in {m.path} (expected once): the "
                 f"source moved, update tests/mutation_check.py\n  text: {m.old!r}")
    path.write_text(text.replace(m.old, m.new))
    return text


def check(tree: Path, mutations: list[Mutation], baseline: bool) -> list[tuple[Mutation, str, float, str]]:
    for m in mutations:  # every substitution is checked before anything runs
        path = tree / m.path
        if path.read_text().count(m.old) != 1:
            apply(tree, m)  # exits with the message
    if baseline:
        for tests, k in union_selections(mutations):
            rc, tail = pytest_run(tree, tests, k)
            if rc != 0:
                sys.exit(f"the unbroken tests fail, so no mutation can be judged ({tail}); rerun them: "
                         f"pytest {' '.join(tests)} -k {k!r}")
            print(f"unbroken: {tail}", flush=True)
    rows = []
    for m in mutations:
        original = apply(tree, m)
        start = time.monotonic()
        try:
            rc, tail = pytest_run(tree, m.tests, m.k)
        finally:
            (tree / m.path).write_text(original)
        # 1: a test failed (caught); 0: all passed (missed); 5: nothing selected; others: pytest itself broke.
        verdict = {1: "caught", 0: "MISSED", 5: "NO TESTS"}.get(rc, f"ERROR rc={rc}")
        rows.append((m, verdict, time.monotonic() - start, tail))
        print(f"{verdict:8s} {m.name} ({time.monotonic() - start:.0f} s): {tail}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="an existing worktree to mutate (default: a fresh one of HEAD)")
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbroken run of each selection")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:40s} {m.path}")
        return 0
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; --list shows them")
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="dcdit-mutation-") as tmp:
        tree = args.tree
        if tree is None:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=REPO, check=True,
                           capture_output=True)
        elif is_main_checkout(tree):
            parser.error(f"{tree} is a repository's main checkout, where others work: give a worktree "
                         "(git worktree add --detach /tmp/m HEAD)")
        try:
            rows = check(tree.resolve(), mutations, baseline=not args.no_baseline)
        finally:
            if args.tree is None:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False, cwd=REPO,
                               capture_output=True)
    width = max(len(m.name) for m, *_ in rows)
    print(f"\n{'mutation':{width}s}  verdict   time  tests")
    for m, verdict, seconds, _ in rows:
        print(f"{m.name:{width}s}  {verdict:8s} {seconds:4.0f}s  {' '.join(m.tests)}{f' -k {m.k!r}' if m.k else ''}")
    missed = [m.name for m, verdict, *_ in rows if verdict != "caught"]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} caught" + (f"; not caught: {', '.join(missed)}" if missed
                                                                       else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
