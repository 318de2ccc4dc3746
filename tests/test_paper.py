"""paper.py: the paper's tables in one place (README's are its output), which run each figure
belongs to, and the paper's figure in train.py's closing line, args.json and plot.py --table,
tested on tiny runs named as paper configurations."""

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from torchvision import datasets

import plot
import synthetic
import train
from runfolders import write_run
from training import paper, recipes
from training.settings import resolve

ROOT = Path(__file__).resolve().parent.parent
CPU = recipes.Capabilities("cpu", False, True)


def settings(given: dict) -> dict:
    """Every setting of a run with these flags, as train.py resolves and records them."""
    resolved, _ = resolve({"save": "x", **given}, CPU)
    return vars(resolved)


def test_readme_tables_are_paper_py_output():
    readme = (ROOT / "README.md").read_text()
    for table in paper.markdown().split("\n\n"):
        assert table in readme


def model_flags(m: paper.CifarModel) -> dict:
    return {"depth": m.depth, "growth": m.growth, "bottleneck": m.bc}


COLUMN_FLAGS = {
    "C10": {"dataset": "cifar10", "augment": False},
    "C10+": {"dataset": "cifar10"},
    "C100": {"dataset": "cifar100", "augment": False},
    "C100+": {"dataset": "cifar100"},
    "SVHN": {"dataset": "svhn"},
}


@pytest.mark.parametrize("model", paper.TABLE2, ids=lambda m: m.name)
@pytest.mark.parametrize("column", paper.COLUMNS)
def test_each_table2_entry_belongs_to_the_recipe_run_of_its_model(model, column):
    found = paper.lookup(settings({**model_flags(model), **COLUMN_FLAGS[column]}))
    if model.errors[column] is None:
        assert found is None
        return
    assert found.test_err == model.errors[column] and found.source.endswith(
        f"{model.name}, {column}"
    )
    assert found.differs == ()  # train.py's recipe for the dataset is the paper's (Sec. 4.2)
    assert found.reported == ("best_val" if column == "SVHN" else "final")  # Sec. 4.1


@pytest.mark.parametrize("model", [m for m in paper.TABLE3 if m.top1], ids=lambda m: m.arch)
@pytest.mark.parametrize("ten_crop", [False, True])
def test_each_table3_entry_belongs_to_the_recipe_run_of_its_arch(model, ten_crop):
    found = paper.lookup(
        settings({"dataset": "imagenet", "arch": model.arch, "ten_crop": ten_crop})
    )
    assert (found.test_err, found.test_top5) == (model.top1[ten_crop], model.top5[ten_crop])
    assert found.differs == () and found.reported == "final"


@pytest.mark.parametrize(
    "given",
    [
        {"dataset": "svhn", "augment": True},  # SVHN is in the table without augmentation
        {"depth": 100, "growth": 12, "compression": 1.0},  # DenseNet-B: not in Table 2
        {"depth": 40, "growth": 12},  # DenseNet-BC-40-12: not in Table 2
        {"depth": 190, "growth": 40, "augment": False},  # BC-190-40 has no C10 figure
        {"dataset": "fashion-mnist"},
        {"dataset": "mnist", "depth": 40, "growth": 12, "bottleneck": False},
        {"model": "diracnet"},
        {"dataset": "imagenet", "arch": "densenet161"},
        {"dataset": "imagenet", "arch": "diracnet18"},
    ],
)
def test_runs_that_are_no_paper_configuration(given):
    assert paper.lookup(settings(given)) is None
    assert paper.record(settings(given)) == {"paper_test_err": None}


def test_the_papers_settings_are_named_where_a_run_differs():
    given = {"epochs": 3, "batch_size": 32, "lr": 0.05, "train_subset": 64, "val_split": 10,
             "nesterov": False, "drop_rate": 0.1, "milestones": [0.3]}  # fmt: skip
    found = paper.lookup(settings(given))
    assert found.differs == (
        "300 epochs", "batch 64", "lr 0.1", "Nesterov momentum",
        "lr drops at 50 % and 75 % of the epochs", "no dropout", "the whole training set",
    )  # fmt: skip
    assert found.text() == f"paper 4.51% at {', '.join(found.differs)}"
    imagenet = paper.lookup(settings({"dataset": "imagenet", "epochs": 2, "colour_augment": False}))
    assert imagenet.differs == ("90 epochs", "colour augmentation")


def test_svhn_puts_the_paper_beside_best_pt(tmp_path):
    row = {"epoch": 1, "lr": 0.1, "train_err": 20.0, "val_err": 3.0, "test_err": 3.5}
    rows = [
        row,
        {**row, "epoch": 2, "val_err": 2.0, "test_err": 2.1},
        {**row, "epoch": 3, "test_err": 2.3},
    ]
    line = train.reported(
        write_run(tmp_path / "run", rows), settings({"dataset": "svhn", "epochs": 3})
    )
    assert line == ("final test error 2.30% (epoch 3); best.pt: epoch 2, lowest validation "
                    "error 2.00%, its test error 2.10% (paper 1.76% at 40 epochs)")  # fmt: skip


def test_imagenet_closing_line_has_top5_beside_the_paper(tmp_path):
    rows = [{"epoch": 90, "lr": 0.001, "test_err": 24.0, "test_top5": 7.5}]
    given = {"dataset": "imagenet", "arch": "densenet169", "ten_crop": True}
    line = train.reported(write_run(tmp_path / "run", rows), settings(given))
    assert line == "final test error 24.00% (epoch 90; paper 22.08%), top-5 7.50% (paper 5.92%)"


# ----------------------------------------------------------------------------- real runs

TINY_PAPER_RUN = ["--depth", "100", "--growth", "12", "--epochs", "1", "--train-subset", "32",
                  "--batch-size", "32", "--device", "cpu", "--no-plot"]  # fmt: skip


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """DenseNet-BC-100-12 on C10+ (the paper's 769,162 parameters, one step on 32 synthetic
    CIFAR-10 images), and a tiny model that is no paper configuration on the same data:
    each run's folder and the closing line train.py printed."""
    root = tmp_path_factory.mktemp("paper")
    syn = synthetic.make_cifar(root / "data", n_train=32, n_test=20)
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        synthetic.register_md5(mp, datasets.CIFAR10, syn.md5)
        for name, extra in {"c10+": [], "tiny": ["--depth", "10", "--growth", "4"]}.items():
            save, out = root / name, io.StringIO()
            argv = [*TINY_PAPER_RUN, *extra, "--data-dir", str(root / "data"), "--save", str(save)]
            with contextlib.redirect_stdout(out):
                assert train.main(argv) == 0
            runs[name] = save, out.getvalue().strip().splitlines()[-1]
    return runs


def test_closing_line_and_args_json_of_a_run_named_as_a_paper_configuration(paper_runs):
    folder, closing = paper_runs["c10+"]
    args = json.loads((folder / "args.json").read_text())
    last = pd.read_csv(folder / "log.csv").iloc[-1]
    differs = ["300 epochs", "batch 64", "the whole training set"]
    assert (
        closing
        == f"final test error {last.test_err:.2f}% (epoch 1; paper 4.51% at {', '.join(differs)})"
    )
    assert args["paper_test_err"] == 4.51 and args["paper_differs"] == differs
    assert args["paper_reported"] == "final"
    assert args["paper_source"] == "Table 2, DenseNet-BC (L=100, k=12), C10+"
    # the same run without augmentation is C10: its figure, and the dropout the paper used
    c10 = {**args, "augment": False, "drop_rate": 0.2}
    assert train.reported(folder, c10) == closing.replace("paper 4.51%", "paper 5.92%")


def test_a_run_that_is_no_paper_configuration_closes_as_before(paper_runs):
    folder, closing = paper_runs["tiny"]
    args = json.loads((folder / "args.json").read_text())
    last = pd.read_csv(folder / "log.csv").iloc[-1]
    assert closing == f"final test error {last.test_err:.2f}% (epoch 1)"
    assert args["paper_test_err"] is None and "paper_source" not in args


def test_table_of_real_runs_shows_the_paper_for_paper_configurations(paper_runs, tmp_path, capsys):
    runs = [paper_runs[name][0] for name in ("c10+", "tiny")]
    assert plot.main(["--table", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    csv = pd.read_csv(tmp_path / "out/table.csv")
    assert list(zip(csv.model, csv.data, csv.n, strict=True)) == [
        ("DenseNet-BC-100-12", "C10+", 1), ("DenseNet-BC-10-4", "C10+", 1)]  # fmt: skip
    final = pd.read_csv(runs[0] / "log.csv").test_err.iloc[-1]
    assert csv.final_test_err[0] == final and csv.difference[0] == pytest.approx(final - 4.51)
    assert (
        f"| {final:.2f} (1) | – | 4.51 at 300 epochs, batch 64, the whole training set | {final - 4.51:+.2f} |"
        in lines[0]
    )
    assert lines[1].endswith("| – | – | – | – |")  # the tiny model: no best-val, paper, difference
