"""Reporting: per-round console lines, verdicts and the Markdown summary (pure functions of
the ``leakage.jsonl`` rows)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..attacks.base import reconstructs_images

#: Row statuses in ``leakage.jsonl``.
STATUSES: tuple[str, ...] = ("ok", "error", "timeout", "dropped", "skipped")
#: Default SSIM from which a reconstruction counts as a successful attack.
DEFAULT_SUCCESS_SSIM = 0.6


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _rejected_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``"; 1 more claimed but rejected as mixtures"`` where an attack verified its claims
    (``info["claimed"]`` vs ``recovered``; see ``analytic``), else ``""``."""
    rejected = 0
    for r in rows:
        info = r.get("info")
        if isinstance(info, Mapping) and isinstance(info.get("claimed"), int):
            rejected += info["claimed"] - int(r.get("recovered") or 0)
    return f"; {rejected} more claimed but rejected as mixtures" if rejected else ""


def image_successes(row: Mapping[str, Any], success_ssim: float) -> tuple[int, int]:
    """(images this scored row reconstructed successfully, images behind the update)."""
    total = int(row.get("batch_size") or 1)
    if not reconstructs_images(str(row.get("attack"))):  # the leak is the labels themselves
        acc = row.get("label_accuracy")
        return (round(acc * total) if acc is not None else 0), total
    per_image = row.get("per_image")
    ssims = per_image.get("ssim") if isinstance(per_image, Mapping) else None
    if isinstance(ssims, list) and ssims and all(v is not None for v in ssims):
        return sum(v >= success_ssim for v in ssims), len(ssims)
    return (total if row.get("success") else 0), total


def class_chance(pool: int, classes: int | None) -> float:
    """How often an example is re-identified when the reconstructions carry only its class:
    it must beat the pool's images of that class, about ``pool / classes`` of them."""
    return 1.0 / (1.0 + pool / classes) if classes else 1.0 / (pool + 1)


def re_identifies(linked: int, tested: int, chance: float) -> bool:
    """Whether ``linked`` of ``tested`` examples is reported as a (possible) leak: at least
    half of them, and at least twice what the class alone would link."""
    return tested > 0 and linked / tested >= max(0.5, min(1.0, 2 * chance))


def linked_images(rows: Iterable[Mapping[str, Any]]) -> tuple[int, int, int, float] | None:
    """(examples re-identified, examples tested, size of the reference pool, the rate the
    class alone gives) over the rows that ran the re-identification test, or None."""
    tested = [r for r in rows if r.get("linked") is not None]
    if not tested:
        return None
    total = 0
    for r in tested:
        flags = (r.get("per_image") or {}).get("linked")
        total += len(flags) if isinstance(flags, list) else int(r.get("batch_size") or 1)
    pool = int(tested[0].get("references") or 0)
    chance = class_chance(pool, tested[0].get("classes"))
    return sum(int(r["linked"]) for r in tested), total, pool, chance


def _linked_text(link: tuple[int, int, int, float]) -> str:
    k, n, pool, chance = link
    return (
        f"re-identified {k}/{n} of them among {pool} other images (chance 1 in {pool + 1}; "
        f"about 1 in {1 / chance:.0f} from the class alone)"
    )


def round_leakage(rows: Sequence[Mapping[str, Any]], attacks: Sequence[str]) -> str:
    """Compact per-attack leakage of one round: ``"analytic 2/2 ssim 1.00, ig 0/2 ssim 0.12"``.

    Scored rows give successes/scored updates and the mean SSIM; unscored rows give the
    number of reconstructions (and the attack's own exact-recovery claims); failures are
    counted by status.
    """
    parts = []
    for attack in attacks:
        mine = [r for r in rows if r.get("attack") == attack]
        ok = [r for r in mine if r.get("status") == "ok"]
        scored = [r for r in ok if r.get("scored")]
        if scored:
            hits = sum(bool(r.get("success")) for r in scored)
            text = f"{attack} {hits}/{len(scored)}"
            ssim = _mean(r.get("ssim") for r in scored)
            if ssim is not None:
                text += f" ssim {ssim:.2f}"
            elif not reconstructs_images(attack):
                text += f" label-acc {_fmt(_mean(r.get('label_accuracy') for r in scored))}"
        elif ok:
            text = f"{attack} {len(ok)} unscored"
            claims = [r["recovered"] for r in ok if r.get("recovered") is not None]
            if claims:
                text += f" (claims {sum(claims)}/{sum(r['batch_size'] for r in ok)} exact"
                text += _rejected_text(ok) + ")"
        else:
            text = f"{attack} -"
        fails = {s: sum(r.get("status") == s for r in mine) for s in STATUSES[1:]}
        fails_text = ", ".join(f"{n} {s}" for s, n in fails.items() if n)
        parts.append(text + (f" [{fails_text}]" if fails_text else ""))
    return ", ".join(parts)


def verdicts(
    rows: Sequence[Mapping[str, Any]],
    attacks: Sequence[str],
    defenses: Sequence[str] | None = None,
    success_ssim: float = DEFAULT_SUCCESS_SSIM,
    recon_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """One verdict line per configured defense, naming the attacks that succeeded.

    The wording never claims safety: a verdict is evidence from the attacks tried.
    """
    defenses = list(defenses or dict.fromkeys(str(r.get("defense", "none")) for r in rows))
    lines = []
    for defense in defenses:
        mine = [r for r in rows if str(r.get("defense", "none")) == defense]
        where = "with no defense" if defense in ("none", "") else f"despite defense {defense}"
        under = "with no defense" if defense in ("none", "") else f"under defense {defense}"
        ok = [r for r in mine if r.get("status") == "ok"]
        scored = [r for r in ok if r.get("scored")]
        failed = len(mine) - len(ok)
        fail_note = (
            f" ({failed} attack runs failed, timed out, were dropped or skipped)" if failed else ""
        )
        if not mine:
            lines.append(f"NOTHING AUDITED {under}.")
        elif not ok:
            lines.append(f"NO EVIDENCE {under}: every attack run failed{fail_note}.")
        elif scored:
            leaks, possible, best, notes = [], [], None, []
            for attack in attacks:
                a_rows = [r for r in scored if r.get("attack") == attack]
                if not a_rows:
                    continue
                hits = [image_successes(r, success_ssim) for r in a_rows]
                k, n = sum(h for h, _ in hits), sum(t for _, t in hits)
                ssim = _mean(r.get("ssim") for r in a_rows)
                images = reconstructs_images(attack)
                if images and ssim is not None and (best is None or ssim > best[1]):
                    best = (attack, ssim)
                if k and not images:
                    acc = _mean(r.get("label_accuracy") for r in a_rows)
                    base = _mean(r.get("label_baseline") for r in a_rows)
                    if acc is not None and base is not None and acc <= base:
                        # Label counts of a large batch: guessing even counts does as well.
                        notes.append(
                            f"labels: label accuracy {_fmt(acc)} is no better than guessing "
                            f"even class counts ({_fmt(base)}), not counted as a leak"
                        )
                        continue
                    leaks.append(
                        f"{attack} recovered the labels of {k}/{n} audited images "
                        f"(label accuracy {_fmt(acc)}"
                        + (f"; even-count guess {_fmt(base)})" if base is not None else ")")
                    )
                elif k:
                    link = linked_images(a_rows)
                    leaks.append(
                        f"{attack} reconstructed {k}/{n} audited images (SSIM {_fmt(ssim)}"
                        + (f"; {link[0]}/{link[1]} re-identified)" if link else ")")
                    )
                elif (
                    images and (link := linked_images(a_rows)) and re_identifies(*link[:2], link[3])
                ):
                    # SSIM misses blurred or low-contrast reconstructions that still show
                    # whose example it was; but a link can also come from a faint signal
                    # nobody would recognise, so it is reported as possible, not proven.
                    possible.append(
                        f"{attack} reconstructed no image to SSIM {success_ssim:.2f} (mean "
                        f"{_fmt(ssim)}) but {_linked_text(link)}"
                    )
            note = f" ({'; '.join(notes)})" if notes else ""
            if leaks:
                also = f" Also: {'; '.join(possible)}." if possible else ""
                lines.append(f"LEAK: {'; '.join(leaks)} {where}{fail_note}.{note}{also}")
            elif possible:
                lines.append(
                    f"POSSIBLE LEAK: {'; '.join(possible)} {where}{fail_note}.{note} The "
                    "reconstructions resemble the clients' examples more than other images do; "
                    "look at them: they may be recognisable under the SSIM bar, or carry only a "
                    "faint trace."
                )
            else:
                tried = ", ".join(a for a in attacks if any(r.get("attack") == a for r in scored))
                best_text = f"; best mean SSIM {best[1]:.2f} by {best[0]}" if best else ""
                lines.append(
                    f"NO LEAK FOUND {under}: no reconstruction by {tried} reached SSIM "
                    f"{success_ssim:.2f}{best_text}{fail_note}{note}. This is evidence from these "
                    "attacks at this budget, not a guarantee: a stronger attack, a larger "
                    "budget or other rounds may still recover the data."
                )
        else:
            evidence = []
            for attack in attacks:
                a_rows = [r for r in ok if r.get("attack") == attack]
                if not a_rows:
                    continue
                text = f"{attack}: {len(a_rows)} reconstruction(s)"
                claims = [r["recovered"] for r in a_rows if r.get("recovered") is not None]
                if claims:
                    total = sum(int(r.get("batch_size") or 1) for r in a_rows)
                    text += f", claims exact recovery of {sum(claims)}/{total} images"
                    text += _rejected_text(a_rows)
                losses = [r.get("loss") for r in a_rows if r.get("loss") is not None]
                if losses:
                    text += f", median final attack loss {statistics.median(losses):.3g}"
                if any(r.get("labels") is not None for r in a_rows):
                    text += ", labels returned (unverified)"
                evidence.append(text)
            place = f" in {recon_dir}" if recon_dir else ""
            lines.append(
                f"SCORES UNAVAILABLE {under}: no ground truth ({unscored_reasons(ok)}), so "
                f"leakage cannot be measured. Evidence: {'; '.join(evidence)}{fail_note}. "
                f"Inspect the reconstructions{place}."
            )
        guess = assumed_text(mine)
        if guess and lines:
            lines[-1] += " " + guess
    return lines


def _truth_source(rows: Iterable[Mapping[str, Any]]) -> str:
    methods = {r.get("match_method") for r in rows if r.get("scored")}
    if methods & {"optimal", "nearest"}:
        return "partition_fn: each reconstruction against its best match in the partition"
    return "the examples behind each update"


def unscored_reasons(rows: Iterable[Mapping[str, Any]]) -> str:
    """Why these rows have no scores, from the rows themselves (older rows: deployment)."""
    reasons = dict.fromkeys(str(r.get("unscored_reason") or "deployment") for r in rows)
    return "; ".join(reasons) or "deployment"


def assumed_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """The verdict's note on guessed local training ("" when nothing was guessed)."""
    guessed = [r for r in rows if r.get("assumed")]
    if not guessed:
        return ""
    fields = ", ".join(dict.fromkeys(f for r in guessed for f in r["assumed"]))
    return (
        f"The attacks on weight updates assumed the clients' training ({fields} guessed: "
        f"{guessed[0].get('training')}); nobody stated it (pass local=LocalTraining(...)), "
        "and a wrong guess weakens every attack on weight updates."
    )


def training_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One Markdown bullet per distinct training the attacks assumed, with its update count."""
    counts: dict[tuple[str, tuple[str, ...]], set[tuple[Any, str]]] = {}
    for r in rows:
        if r.get("training"):
            key = (str(r["training"]), tuple(r.get("assumed") or ()))
            counts.setdefault(key, set()).add((r["round"], str(r["client"])))
    out = []
    for (text, assumed), updates in counts.items():
        note = f"; guessed: {', '.join(assumed)}" if assumed else "; as stated"
        out.append(f"- `{text}` ({len(updates)} update(s){note})")
    return out


def summarize(
    rows: Sequence[Mapping[str, Any]],
    attacks: Sequence[str],
    *,
    defenses: Sequence[str] | None = None,
    success_ssim: float = DEFAULT_SUCCESS_SSIM,
    recon_dir: str | os.PathLike[str] | None = None,
    grids: int = 0,
    jsonl: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    dropped_jobs: int = 0,
    abandoned: int = 0,
    budget: str = "",
    start_failure: str | None = None,
) -> str:
    """The Markdown summary: verdicts, the training assumed, a per-attack table, outputs and
    failures."""
    rounds = sorted({r["round"] for r in rows})
    updates = {(r["round"], str(r["client"])) for r in rows}
    scored_any = any(r.get("scored") for r in rows)
    out = ["# Leakage audit", ""]
    out.append(
        f"Honest-but-curious server audit: {', '.join(attacks)} on {len(updates)} client "
        f"update(s) from {len(rounds)} round(s)" + (f" ({budget})." if budget else ".")
    )
    if scored_any:
        out.append(
            "Scored against the clients' true data from the explicit ground-truth channel "
            f"({_truth_source(rows)}); "
            f"success = SSIM >= {success_ssim:.2f}"
            + (
                "; *linked*: examples that some reconstruction resembles more than any "
                "reconstruction resembles an image of a reference pool (a re-identification "
                "test)."
                if any(r.get("linked") is not None for r in rows)
                else "."
            )
        )
    else:
        out.append(
            f"No ground truth ({unscored_reasons(rows)}): "
            "scores are unavailable; the reference-free evidence is shown."
        )
    if any(r.get("aggregate_only") for r in rows):
        out.append(
            "Secure aggregation (SecAgg+): the server saw only each round's sum of the "
            "clients' updates; individual updates were never visible. Rows marked "
            "`aggregate_only` attack that sum as one large-batch update of all its clients' "
            "examples together."
        )
    if start_failure:
        out += ["", f"**The audit could not run: {start_failure}.**"]
    out += ["", "## Verdict", ""]
    out += [f"- {line}" for line in verdicts(rows, attacks, defenses, success_ssim, recon_dir)]
    out += [
        "",
        "A verdict is evidence from the attacks tried, at their budget, on the audited "
        "rounds and clients. It is never a proof of privacy.",
    ]
    trainings = training_lines(rows)
    if trainings:
        out += ["", "## Training the attacks assumed", "", *trainings]
    out += [
        "",
        "## Per attack",
        "",
        "| defense | attack | runs | ok | error | timeout | dropped | skipped | images recovered "
        "| images linked | mean PSNR (dB) "
        "| mean SSIM | label acc. | mean s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_defenses = list(defenses or dict.fromkeys(str(r.get("defense", "none")) for r in rows))
    for defense in all_defenses:
        for attack in attacks:
            mine = [
                r
                for r in rows
                if r.get("attack") == attack and str(r.get("defense", "none")) == defense
            ]
            if not mine:
                continue
            count = {s: sum(r.get("status") == s for r in mine) for s in STATUSES}
            scored = [r for r in mine if r.get("status") == "ok" and r.get("scored")]
            hits = [image_successes(r, success_ssim) for r in scored]
            rate = f"{sum(h for h, _ in hits)}/{sum(n for _, n in hits)}" if scored else "n/a"
            images = reconstructs_images(attack)  # a label attack reconstructs no image
            psnr = _mean(r.get("psnr") for r in scored) if images else None
            ssim = _mean(r.get("ssim") for r in scored) if images else None
            acc = _mean(r.get("label_accuracy") for r in scored)
            secs = _mean(r.get("seconds") for r in mine if r.get("status") == "ok")
            link = linked_images(scored) if images else None
            linked = f"{link[0]}/{link[1]}" if link else "n/a"
            out.append(
                f"| {defense} | {attack} | {len(mine)} | {count['ok']} | {count['error']} | "
                f"{count['timeout']} | {count['dropped']} | {count['skipped']} | {rate} | "
                f"{linked} | "
                f"{_fmt(psnr, '.1f')} | "
                f"{_fmt(ssim)} | {_fmt(acc)} | {_fmt(secs, '.1f')} |"
            )
    out += ["", "## Outputs", ""]
    if jsonl:
        out.append(f"- per (round, client, attack) results: `{jsonl}`")
    if plot:
        out.append(f"- leakage over rounds: `{plot}`")
    if recon_dir:
        n_tensors = sum(bool(r.get("reconstruction")) for r in rows)
        out.append(
            f"- reconstructions, owner-only (directory 0700, files 0600): `{recon_dir}` "
            f"({grids} round grid(s), {n_tensors} tensor file(s)). They may show the clients' "
            "private data: share them as you would the data itself."
        )
    if dropped_jobs or abandoned:
        out.append(
            f"- lost work: {dropped_jobs} job(s) dropped at submission (queue full or closed), "
            f"{abandoned} attack run(s) abandoned at close"
        )
    failures = [r for r in rows if r.get("status") in ("error", "timeout", "skipped")]
    if failures:
        out += ["", "## Failures", ""]
        for r in failures[:10]:
            out.append(
                f"- round {r['round']} client {r['client']} {r['attack']}: {r['status']}: "
                f"{r.get('error')}"
            )
        if len(failures) > 10:
            out.append(f"- ... and {len(failures) - 10} more in `{jsonl or 'leakage.jsonl'}`")
    return "\n".join(out) + "\n"
