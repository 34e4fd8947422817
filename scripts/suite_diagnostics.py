"""Does entropy track accuracy on a built-in suite? Entropy and accuracy of every expert on every
task, and of task arithmetic along its lambda ray.

AdaMerging minimises the prediction entropy of the merged model on unlabeled test images; it can
only help where lower entropy means higher accuracy. This prints, per task, ``(mean entropy,
top-1 %)`` on the test split for the base, each expert, and ``base + lambda * sum_k tau_k``, so one
can see where the entropy minimum and the accuracy maximum lie. It also prints each expert's
accuracy on its own task once its task vector is trimmed as TIES / AdaMerging++ trim it, and a
linear probe on the base's features (how good the features are, apart from the zero-shot heads).

    python scripts/suite_diagnostics.py --suite demo [--set expert_lr=1e-4 ...] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse

import torch

from adamerge.engine.task_vectors import TaskVectors
from adamerge.io.checkpoints import load_state_dict
from adamerge.methods.static import ties_task_vectors
from adamerge.options import parse_overrides
from adamerge.suites import synthetic as S


def entropy_and_accuracy(encoder: torch.nn.Module, state: dict[str, torch.Tensor],
                         heads: dict[str, torch.Tensor], data: dict) -> dict[str, tuple[float, float]]:
    """``{task: (mean entropy in nats, top-1 accuracy in %)}`` of ``state`` on each task's data."""
    encoder.load_state_dict(state)
    encoder.eval()
    out = {}
    with torch.no_grad():
        for task, (x, y) in data.items():
            logits = encoder(x) @ heads[f"{task}.weight"].t()
            p = logits.softmax(-1)
            h = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
            out[task] = (round(h, 3), round((logits.argmax(-1) == y).float().mean().item() * 100, 1))
    return out


def linear_probe(encoder: torch.nn.Module, state: dict[str, torch.Tensor], spec) -> dict[str, float]:
    """Top-1 % on the test split of a logistic regression fit on ``state``'s train-split features:
    how good the features are, apart from how well the zero-shot heads fit them."""
    from sklearn.linear_model import LogisticRegression
    encoder.load_state_dict(state)
    encoder.eval()
    out = {}
    with torch.no_grad():
        for t in spec.tasks:
            d = S.task_data(spec, t)
            (xtr, ytr), (xte, yte) = d["train"], d["test"]
            clf = LogisticRegression(max_iter=2000).fit(encoder(xtr).numpy(), ytr.numpy())
            out[t] = round(clf.score(encoder(xte).numpy(), yte.numpy()) * 100, 1)
    return out


def _row(name: str, res: dict[str, tuple[float, float]]) -> str:
    total_h = sum(h for h, _ in res.values())
    avg = sum(a for _, a in res.values()) / len(res)
    cells = "  ".join(f"{t} {h:.2f}/{a:.1f}" for t, (h, a) in res.items())
    return f"{name:<22} sum H {total_h:5.2f}  avg acc {avg:5.1f}  |  {cells}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="demo", help="preset: tiny or demo (default: demo)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override suite spec fields (JSON values, else strings), e.g. expert_lr=1e-4")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.8],
                    help="task-arithmetic lambdas to scan (default: 0.1 0.2 0.3 0.5 0.8)")
    ap.add_argument("--ties-keep", type=float, default=0.2,
                    help="fraction of each task vector the TIES trim keeps (default: 0.2, the paper's)")
    ap.add_argument("--cache-dir", default=None, help="suite cache (default: $ADAMERGE_CACHE or ~/.cache/adamerge)")
    ns = ap.parse_args(argv)
    try:
        spec = S.get_spec(ns.suite, **parse_overrides(ns.set))
    except ValueError as exc:
        ap.error(str(exc))
    folder = S.ensure_suite(spec, ns.cache_dir)
    encoder = S.make_encoder(spec)
    base = load_state_dict(folder / "base.safetensors")
    heads = load_state_dict(folder / "heads.safetensors")
    experts = {t: load_state_dict(folder / f"expert_{t}.safetensors") for t in spec.tasks}
    data = {t: S.task_data(spec, t)["test"] for t in spec.tasks}
    print(f"suite {ns.suite} {spec.key()}: cells are task entropy/accuracy on the test split")
    print(_row("base", entropy_and_accuracy(encoder, base, heads, data)))
    print("linear probe on the base's features (train split -> test): "
          + "  ".join(f"{t} {a:.1f}" for t, a in linear_probe(encoder, base, spec).items()))
    for t, state in experts.items():
        print(_row(f"expert {t}", entropy_and_accuracy(encoder, state, heads, data)))
    individual = {t: entropy_and_accuracy(encoder, experts[t], heads, {t: data[t]})[t][1] for t in spec.tasks}
    # What the TIES trim (and so AdaMerging++) leaves of each expert: base + its task vector cut to
    # the top `keep` magnitudes, on its own task.
    names = [n for n, _ in encoder.named_parameters()]
    trimmed = {}
    for t in spec.tasks:
        tv = ties_task_vectors(TaskVectors.from_state_dicts(base, {t: experts[t]}, names=names), keep=ns.ties_keep)
        state = {**base, **{n: base[n] + v for n, v in tv.task(0).items()}}
        trimmed[t] = entropy_and_accuracy(encoder, state, heads, {t: data[t]})[t][1]
    print(f"own-task accuracy, expert -> task vector trimmed to the top {ns.ties_keep:g}: "
          + "  ".join(f"{t} {individual[t]:.1f} -> {trimmed[t]:.1f}" for t in spec.tasks))
    ray = {}
    for lam in ns.lambdas:
        merged = {k: v + lam * sum(e[k] - v for e in experts.values()) if v.is_floating_point() else v
                  for k, v in base.items()}
        ray[lam] = entropy_and_accuracy(encoder, merged, heads, data)
        print(_row(f"task arithmetic {lam:g}", ray[lam]))
    # Summary: the gap between task arithmetic and the experts, and whether the entropy minimum
    # and the accuracy maximum of one shared lambda coincide (layer-wise coefficients are not on
    # this ray, so they can help even where these do not coincide: see docs/demo.md).
    h = {lam: sum(e for e, _ in r.values()) for lam, r in ray.items()}
    acc = {lam: sum(a for _, a in r.values()) / len(r) for lam, r in ray.items()}
    ind = sum(individual.values()) / len(individual)
    lam_h, lam_a = min(h, key=h.get), max(acc, key=acc.get)
    print(f"individual avg {ind:.1f}; task arithmetic best {acc[lam_a]:.1f} at lambda {lam_a:g} "
          f"(gap {ind - acc[lam_a]:.1f}); entropy minimum at lambda {lam_h:g} "
          f"({'aligned' if lam_h == lam_a else 'NOT aligned'} with the accuracy maximum)")


if __name__ == "__main__":
    main()
