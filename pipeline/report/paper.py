"""The paper's numbers, transcribed (pure data): every table cell we compare against, which fit makes each
row, and the configurations the tables and figures need.  Nothing here reads a file."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ACCURACY_KEYS

METRICS = ACCURACY_KEYS  # the accuracies of a table cell: All, Many, Medium, Few
METRIC_LABEL = {"all": "All", "many": "Many", "medium": "Med", "few": "Few"}
TAU_SWEEP = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # Fig. 5
LA_TAU = 0.125  # "+LA" rows of the paper (Sec. 4.3: tau = 1/8)

DATASET_LABEL = {"cifar10-lt": "CIFAR-10-LT", "cifar100-lt": "CIFAR-100-LT", "cifar20-lt": "CIFAR-20-LT",
                 "imagenet-lt": "ImageNet-LT", "places-lt": "Places-LT", "inat2018": "iNaturalist-2018",
                 "imagefolder": "ImageFolder"}
FAMILY = {"cifar10-lt": "cifar", "cifar100-lt": "cifar", "cifar20-lt": "cifar", "imagenet-lt": "imagenet",
          "places-lt": "imagenet", "inat2018": "imagenet", "imagefolder": "cifar"}
NATURAL_SPLIT = ("imagenet-lt", "places-lt", "inat2018")  # beta is fixed by the split files

def dataset_label(dataset, imbalance=None) -> str:
    name = DATASET_LABEL.get(dataset, dataset)
    if dataset in NATURAL_SPLIT or imbalance is None:
        return name
    return f"{name} β={fmt_beta(imbalance)}"


def fmt_beta(b) -> str:
    b = float(b)
    return str(int(b)) if b.is_integer() else f"{b:g}"


def fmt_tau(t) -> str:
    return f"{float(t):g}"


# ----------------------------------------------------------------------------------------------------

# The paper's tables, transcribed (None = "-" in the paper)

@dataclass(frozen=True)
class Spec:
    """Which fits make a table row: head, feature variant, logit-adjustment tau, required hparams."""
    head: str
    variant: str = "plain"
    tau: float = 0.0
    hparams: tuple = ()  # ((key, value), ...) that the row's hparams JSON must contain

    def without(self, key: str) -> "Spec":
        """This spec without the required hparam ``key`` (a fit on the test images -> the same fit on train)."""
        return Spec(self.head, self.variant, self.tau, tuple((k, v) for k, v in self.hparams if k != key))

    def label(self) -> str:
        s = self.head + ("" if self.variant == "plain" else f" [{self.variant}]")
        s += "" if self.tau == 0 else f" τ={fmt_tau(self.tau)}"
        return s + "".join(f" {k}={v}" for k, v in self.hparams)


def H(head, tau=0.0, variant="plain", **hp) -> Spec:
    return Spec(head, variant, float(tau), tuple(sorted(hp.items())))


@dataclass
class TableRow:
    method: str
    spec: Spec | None  # None: not run here
    paper: list
    kind: str = "ours"  # ours | literature | paper-only


@dataclass
class TableSpec:
    name: str
    title: str
    columns: list  # [(dataset, imbalance or None, metric)]
    rows: list


def _cols(dataset, beta, metrics):
    return [(dataset, None if beta is None else float(beta), m) for m in metrics]


A4 = METRICS
A3 = ("all", "many", "medium")
LIT = "literature"

TABLES = [
    TableSpec("table1", "Table 1: Ablation study for CIFAR-100-LT (+LA = logit adjustment, τ = 1/8)",
              _cols("cifar100-lt", 200, A4) + _cols("cifar100-lt", 100, A4) + _cols("cifar100-lt", 10, A3), [
                  TableRow("Softmax", H("softmax"), [41.2, 76.1, 46.6, 10.2, 46.0, 73.8, 46.0, 13.6, 62.3, 68.7, 48.0]),
                  TableRow("NCM", H("ncm"), [43.4, 64.6, 50.4, 21.6, 48.7, 60.7, 52.1, 30.8, 59.0, 61.7, 52.9]),
                  TableRow("Learned NCM", H("learned-ncm"),
                           [45.7, 66.2, 52.4, 24.6, 50.7, 64.6, 53.1, 31.7, 62.1, 64.5, 56.8]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU),
                           [45.9, 62.9, 50.8, 28.9, 50.9, 60.5, 52.9, 37.2, 62.4, 63.7, 59.7]),
                  TableRow("Multi-NCM", H("multi-ncm"),
                           [45.7, 67.3, 51.8, 24.3, 50.8, 64.5, 53.0, 32.3, 62.4, 64.8, 57.3]),
                  TableRow("Multi-NCM + LA", H("multi-ncm", LA_TAU),
                           [46.0, 66.1, 51.9, 25.7, 51.0, 64.7, 53.0, 32.6, 62.5, 64.6, 57.9]),
              ]),
    TableSpec("table2", "Table 2: All accuracy on CIFAR-10-LT and CIFAR-100-LT (β = 200, 100, 10)",
              _cols("cifar10-lt", 200, ["all"]) + _cols("cifar10-lt", 100, ["all"]) + _cols("cifar10-lt", 10, ["all"])
              + _cols("cifar100-lt", 200, ["all"]) + _cols("cifar100-lt", 100, ["all"])
              + _cols("cifar100-lt", 10, ["all"]), [
                  TableRow("Focal (Lin et al. 2017)", None, [65.3, 70.4, 86.7, 35.6, 38.4, 55.8], LIT),
                  TableRow("LDAM (Cao et al. 2019)", None, [None, 77.0, 88.2, None, 42.0, 58.7], LIT),
                  TableRow("Decoupling (cRT) †", H("crt"), [80.2, 81.4, 91.3, 45.3, 50.7, 62.5]),
                  TableRow("NCM", H("ncm"), [79.7, 79.8, 91.2, 43.4, 48.7, 59.0]),
                  TableRow("Learned NCM", H("learned-ncm"), [80.8, 81.6, 91.4, 45.7, 50.7, 62.1]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU), [81.3, 81.4, 91.7, 45.9, 50.9, 62.4]),
              ]),
    TableSpec("table3", "Table 3: CIFAR-100-LT (β = 200) and ImageNet-LT",
              _cols("cifar100-lt", 200, A4) + _cols("imagenet-lt", None, A4), [
                  TableRow("Focal (Lin et al. 2017)", None, [35.6, 60.4, 41.7, 15.7, 30.5, 36.4, 29.9, 16.0], LIT),
                  TableRow("Decoupling (cRT) †", H("crt"), [45.3, 69.5, 50.6, 22.4, 41.2, 51.7, 37.9, 23.1]),
                  TableRow("Decoupling (τ-norm)", H("tau-norm"), [None] * 8),
                  TableRow("Decoupling (LWS)", H("lws"), [None] * 8),
                  TableRow("Post-hoc logit adjustment (τ = 1)", H("posthoc-la", 1.0), [None] * 8),
                  TableRow("CB Experts (Sharma et al. 2020)", None, [None] * 4 + [39.2, 48.2, 37.0, 21.5], LIT),
                  TableRow("LFME (Xiang et al. 2020)", None, [None] * 4 + [38.8, 47.0, 37.9, 19.2], LIT),
                  TableRow("OLTR (Liu et al. 2019)", None, [None] * 4 + [35.6, 43.2, 35.1, 18.5], LIT),
                  TableRow("NCM", H("ncm"), [43.4, 64.6, 50.4, 21.6, 34.4, 42.5, 32.1, 19.7]),
                  TableRow("Learned NCM", H("learned-ncm"), [45.7, 66.2, 52.4, 24.6, 40.0, 48.4, 37.7, 24.5]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU),
                           [45.9, 62.9, 50.8, 28.9, 39.6, 45.1, 38.1, 29.2]),
              ]),
    # Table 5's last line is two rows merged by the text extraction ("76.6 80.2 | 83.1 82.1 | ..."): the
    # first number of each pair follows the "Local Metric + Learned NCM" label; the second set of numbers
    # lost its label (the text mentions a third strategy that it never names) and is shown unmapped.
    TableSpec("table5", "Table 5: jointly learned distance metric and NCM (β = 200)",
              _cols("cifar10-lt", 200, A3) + _cols("cifar100-lt", 200, A4), [
                  TableRow("NCM", H("ncm"), [79.7, 82.2, 73.8, 43.4, 64.6, 50.4, 21.6]),
                  TableRow("Global Metric + Learned NCM", H("metric-ncm", metric="global"),
                           [80.8, 82.2, 77.6, 45.7, 66.2, 52.4, 24.6]),
                  TableRow("Local Metric + Learned NCM", H("metric-ncm", metric="local"),
                           [76.6, 83.1, 61.3, 43.4, 69.7, 48.8, 18.9]),
                  TableRow("(unlabelled row: label lost in the paper text extraction)", None,
                           [80.2, 82.1, 75.9, 43.8, 69.9, 51.0, 18.0], "paper-only"),
                  TableRow("Learned NCM (reference; paper values of Tables 1/7)", H("learned-ncm"),
                           [80.8, 82.2, 77.6, 45.7, 66.2, 52.4, 24.6]),
              ]),
    TableSpec("table6", "Table 6: post-hoc BatchNorm re-estimation (BN), β = 200",
              _cols("cifar10-lt", 200, A3) + _cols("cifar100-lt", 200, A4), [
                  TableRow("Learned NCM", H("learned-ncm"), [80.8, 82.2, 77.6, 45.7, 66.2, 52.4, 24.6]),
                  TableRow("Learned NCM (BN)", H("learned-ncm", variant="bn_recal"),
                           [79.7, 78.2, 83.2, 45.6, 63.4, 52.6, 26.5]),
                  TableRow("Multi-NCM", H("multi-ncm"), [80.8, 82.2, 77.6, 45.7, 67.3, 51.8, 24.2]),
                  TableRow("Multi-NCM (BN)", H("multi-ncm", variant="bn_recal"),
                           [81.4, 81.1, 82.2, 45.8, 65.3, 52.1, 25.8]),
              ]),
    TableSpec("table7", "Table 7: detailed results on CIFAR-10-LT",
              _cols("cifar10-lt", 200, A3) + _cols("cifar10-lt", 100, A3) + _cols("cifar10-lt", 10, ["all"]), [
                  TableRow("Softmax", H("softmax"), [74.0, 83.0, 52.9, 80.3, 81.7, 74.6, 90.3]),
                  TableRow("NCM", H("ncm"), [79.7, 82.2, 73.8, 79.8, 79.0, 82.8, 91.2]),
                  TableRow("Learned NCM", H("learned-ncm"), [80.8, 82.2, 77.6, 81.6, 81.0, 83.9, 91.4]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU), [81.3, 81.8, 79.9, 81.4, 79.6, 87.4, 91.7]),
                  TableRow("Multi-NCM", H("multi-ncm"), [80.8, 82.2, 77.6, 81.6, 81.2, 83.1, 91.3]),
                  TableRow("Multi-NCM + LA", H("multi-ncm", LA_TAU), [81.1, 82.4, 77.8, 81.4, 80.1, 87.0, 91.6]),
              ]),
]
for _t in TABLES:  # transcription sanity: one paper value per column in every row
    for _r in _t.rows:
        assert len(_r.paper) == len(_t.columns), (_t.name, _r.method)

# configurations the tables and figures need (dataset, beta): used for "not run" and --list-missing
NEEDED_CONFIGS = [("cifar10-lt", 200.0), ("cifar10-lt", 100.0), ("cifar10-lt", 10.0),
                  ("cifar100-lt", 200.0), ("cifar100-lt", 100.0), ("cifar100-lt", 10.0),
                  ("cifar20-lt", 200.0), ("cifar20-lt", 100.0), ("cifar20-lt", 10.0),
                  ("imagenet-lt", None)]
BN_CONFIGS = {("cifar10-lt", 200.0), ("cifar100-lt", 200.0)}  # Table 6

# fits the figures need besides the tables' rows: the tau sweep (Fig. 5) and the local projection (Fig. 3);
# Fig. 6 reads the learned-ncm artifact of Table 1's row
FIGURE_SPECS = [H("learned-ncm", t) for t in TAU_SWEEP] + [H("local-projection")]
QUICK_SPECS = [H("ncm"), H("learned-ncm"), H("learned-ncm", LA_TAU)]  # run_all.sh --quick: a smoke test
# every BatchNorm re-estimation variant a cache holds is compared with plain on these heads (the every-head
# table of the cache; README "BatchNorm re-estimation")
BN_COMPARE_HEADS = ("softmax", "ncm", "learned-ncm", "multi-ncm")
# BALMS's CIFAR-LT code (data/ImbalanceCIFAR.py: `train = phase == "train"`) loads the CIFAR *test* set for its
# `train_plain` split, the images a second stage takes class means from.  On these datasets the report also fits
# Table 7's NCM-family heads on the test features, to measure what that would give (a leak, never a table cell).
TRAIN_PLAIN_DATASETS = ("cifar10-lt", "cifar100-lt")
TRAIN_PLAIN_SPECS = [H(r.spec.head, r.spec.tau, r.spec.variant, **dict(r.spec.hparams), fit_split="test")
                     for r in next(t for t in TABLES if t.name == "table7").rows if r.spec.head != "softmax"]


def needed_specs(quick: bool = False) -> list:
    """Every distinct fit the tables and figures use, in table order (the list run_all.sh runs)."""
    if quick:
        return list(QUICK_SPECS)
    out = []
    for t in TABLES:
        for r in t.rows:
            if r.spec is not None and r.spec not in out:
                out.append(r.spec)
    return out + [s for s in FIGURE_SPECS if s not in out]
