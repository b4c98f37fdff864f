"""Paired-seed comparisons: a difference of mIoU seed by seed, its mean and 95% Student-t
interval, and the verdict the interval allows (../shared/SPEC.md's rule). sweep.py, demo.py
and tradeoff.py state every "A beats B" through ``paired_gain``."""
import math
import statistics

import scipy.stats


def mean_std(values):
    """(mean, sample standard deviation, n); the std of one value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


CONFIDENCE = 0.95  # of every interval the tables print


def t_interval(diffs, confidence=CONFIDENCE):
    """(mean, low, high) of paired differences: mean +- t_{(1+c)/2, n-1} * s / sqrt(n), the
    Student's t interval with n - 1 degrees of freedom (t = 4.30 for n = 3 at 95%: with few
    seeds "2 standard errors" is far narrower than 95%). One pair has no interval (nan)."""
    mean, std, n = mean_std(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = scipy.stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low, high, n):
    """The interval in words: 'helps' only when all of it lies above 0, 'hurts' when all of
    it lies below, else no difference that n seeds can detect."""
    if n >= 2 and low > 0:
        return "helps"
    if n >= 2 and high < 0:
        return "hurts"
    return f"no difference detectable with {n} seed{'s' if n != 1 else ''}"


def paired_gain(mious, base):
    """A setting against a baseline, seed by seed ({seed: mIoU} each): the per-seed
    differences over the seeds both ran, their mean, standard error, 95% t-interval and
    verdict."""
    seeds = [s for s in sorted(mious) if s in base]
    diffs = [mious[s] - base[s] for s in seeds]
    mean, low, high = t_interval(diffs)
    n = len(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    return {"gain": mean, "se": se, "n": n, "ci_low": low, "ci_high": high,
            "confidence": CONFIDENCE, "verdict": verdict(low, high, n), "seeds": seeds,
            "diffs": diffs}
