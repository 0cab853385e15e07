"""Case names: pinned ids of the built-in suites (existing runs must still resume), names in
the run directory's alphabet for any grid value, unique in linear time, and --only by name,
group or glob."""

from __future__ import annotations

import re
import time

import pytest

from jobs import plan, suites
from jobs.suites import SuiteError

STORAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # analysis.rundir.layout.NAME_RE, written out on purpose

EMBEDDED = {"digits", "moons"}  # data sets bplab carries; the others are files (MNIST, CIFAR-10)

# The case ids of every built-in suite: the ids `bplab plan` gives for suites on embedded data,
# and for suites whose data are files the ids with an empty data fingerprint. An id hashes the
# settings that differ from their defaults (workers.settings.CaseSettings.digest), so a new
# setting with a default changes none of them (test_a_new_setting_changes_no_pinned_id).
# All were re-pinned once, on purpose, when ids stopped hashing default settings; runs made
# before keep the ids in their cases table and still resume (tests/test_ids.py). A change
# here means `bplab run SUITE --resume RUN` no longer finds the cases of RUN.
PINNED_IDS = {
    "adversarial": ["adv-a-91fcbefb90", "adv-b-8ad29fb69e", "adv-c-085383bf10", "nokland-6391613403"],
    "adversarial-quick": ["standard-9e835e66ba", "adv-7e03429523", "dilated-9f2f427b46", "adv-dilated-c9630564ab",
                          "nokland-040e7b3bf1"],
    "adversarial-source": ["adv-a-91fcbefb90", "adv-a-src-a8dd371b19", "adv-b-8ad29fb69e", "adv-b-src-74413b1965",
                           "adv-c-085383bf10", "adv-c-src-d5b50df4bc"],
    "adversarial-source-quick": ["adv-a-f718ce6217", "adv-a-src-279d276cb2", "adv-b-8091b87704", "adv-b-src-8d74284542",
                                 "adv-c-ada3ebaca8", "adv-c-src-772abc6cf9"],
    "dcn": ["dcn-a9decd8190", "tanh-e7468eff1e", "xavier-f245a47414", "sgd-a0323bec99", "momentum-dd8ba4c19f"],
    "dcn-quick": ["dcn-e28736c855", "tanh-efeacf0ba4", "momentum-ca7b604d96"],
    "dni": ["mnist-synthetic-791283a205", "mnist-bptt-babacc1464", "mnist-autodiff-ff4e6e23ca",
            "digits-synthetic-86a342e3ce", "digits-bptt-57172d1f44", "digits-autodiff-15a9080009"],
    "dni-quick": ["synthetic-c31f087fb9", "bptt-2f08a94c8e", "autodiff-030f7cc402"],
    # the learning-rule suites (docs/learning-rules.md), pinned when they were added
    "feedback": ["bp-s1-e374d2cb7c", "bp-s2-b73858ed45", "bp-s3-66a8fd5483", "bp-s4-d189297185", "bp-s5-2825d1ed16",
                 "fa-s1-59802b96f9", "fa-s2-dfe3f9a8c4", "fa-s3-2a2138ae87", "fa-s4-44f4cef765", "fa-s5-df3a8c5b8a",
                 "dfa-s1-beedb94a21", "dfa-s2-a1dc9a42aa", "dfa-s3-83167487f4", "dfa-s4-efd030b4cc", "dfa-s5-9aa47354f5",
                 "sign-s1-10c6331f54", "sign-s2-1cd5f6bf39", "sign-s3-7e26854188", "sign-s4-7dfa079c95",
                 "sign-s5-369f4e93df", "kp-s1-d446012e11", "kp-s2-1794fc4355", "kp-s3-0eaa4df934", "kp-s4-c8f6df80ed",
                 "kp-s5-e65759864e", "kp-wd-s1-80dc537300", "kp-wd-s2-d0a713c63a", "kp-wd-s3-e2e733a212",
                 "kp-wd-s4-34ba6b0456", "kp-wd-s5-c0c71d8634"],
    "feedback-quick": ["bp-67ed2474c9", "fa-d47b99d6ce", "dfa-da36a509a4", "sign-3b2d40cecf", "sign-frsf-cf0c37afce",
                       "kp-ca2e64b52d"],
    "moons": ["h3-act_tanh-b1035506b5", "h3-act_sigmoid-57393bd89d", "h3-act_relu-637b0bcd3a", "h5-act_tanh-7ac9eda646",
              "h5-act_sigmoid-2af4454daf", "h5-act_relu-6061b523ba", "h8-act_tanh-81c05a39bf",
              "h8-act_sigmoid-e6aedb9850", "h8-act_relu-797d8c18fc", "h50-act_tanh-faf2538e48",
              "h50-act_sigmoid-a505611913", "h50-act_relu-75341edadf", "deep-act_tanh-d8ce1090f3",
              "deep-act_sigmoid-aa133055ac", "deep-act_relu-68fff65248"],
    "moons-quick": ["tanh-h3-e6688f9a8f", "relu-h50-e0ea40b328", "deep-da0c7e4cfc"],
    "quick": ["a-7f312dcb7e", "b-47b40f9168", "c-4e40bca818", "d-0ab44e1d08", "e-753b9342ec", "f-5b0ce85b7a"],
    "unfair": ["a-869d5a2220", "b-5d50287dd4", "c-ea4ab876ed", "d-900a3359be", "e-708b38b891", "f-3328f1c4b9"],
    "unfair-source": ["a-869d5a2220", "a-src-3a8ad29f72", "b-5d50287dd4", "b-src-1fd41366c9", "c-ea4ab876ed",
                      "c-src-7703205d20", "c-tf1-028fcb3a2a", "d-900a3359be", "d-src-b96e24f18e", "d-tf1-b888633b4f",
                      "e-708b38b891", "e-src-028af8d7dc", "e-tf1-241d1bc040", "f-3328f1c4b9", "f-src-2a9e9ce721",
                      "f-tf1-b8c3b03e76"],
    "unfair-source-quick": ["a-f04cceb368", "a-src-2da4e04910", "b-18d4a5e37e", "b-src-3c85774276", "c-e1ffcd636b",
                            "c-src-cccbaf69f5", "c-tf1-1cb5a7a66c", "d-e603a060db", "d-src-81ef2689a2",
                            "d-tf1-e1185db243", "e-062b267614", "e-src-c03faa5fc5", "e-tf1-6f3b2ea082", "f-de3818fab1",
                            "f-src-e30f2da68f", "f-tf1-81838e6255"],
}


# Re-pinned, once, on purpose, when alignment_every was turned on in these suites (each layer's
# update measured against the true gradient, docs/experiments.md): a setting that differs from its
# default is part of the id. Runs made before keep their cases and still resume.
PINNED_IDS.update({
    "quick": ["a-40819dbf5a", "b-2278ab55f1", "c-f41b3336f0", "d-388e341ce3", "e-ab128eb9f3", "f-618d64d579"],
    "unfair": ["a-cca20e4ccb", "b-a213df2b06", "c-9aa38b04f9", "d-57ea9a8a60", "e-e589bfe8b8", "f-7afb167af3"],
    "unfair-source": ["a-cca20e4ccb", "a-src-8932bbec72", "b-a213df2b06", "b-src-af42692314", "c-9aa38b04f9",
                      "c-src-b45d265686", "c-tf1-fb6dddcae6", "d-57ea9a8a60", "d-src-ef0ae6ccaf",
                      "d-tf1-1f3134d3d9", "e-e589bfe8b8", "e-src-c47453b5f4", "e-tf1-af9bcf4607",
                      "f-7afb167af3", "f-src-47891504d9", "f-tf1-d117c3aaa7"],
    "unfair-source-quick": ["a-79e8d5db38", "a-src-3bfaadd43c", "b-433fc8a185", "b-src-a9983ef4be",
                            "c-60c75f8732", "c-src-efde858ed7", "c-tf1-47ba0c3e54", "d-6b27d67e39",
                            "d-src-4c9c2351b6", "d-tf1-052c1ea3f2", "e-b283382d73", "e-src-e4f6c043af",
                            "e-tf1-dada39e1e6", "f-dcd843baf7", "f-src-79b82ecdd5", "f-tf1-ef66c5ad68"],
    "adversarial": ["adv-a-198270419c", "adv-b-0a0c278be3", "adv-c-53e485fcb5", "nokland-d3afcaecd9"],
    "adversarial-quick": ["standard-1d754e2337", "adv-af76871a1e", "dilated-ab905ff2be",
                          "adv-dilated-5ea939070b", "nokland-3cc9ed739f"],
    "dni": ["mnist-synthetic-c4fca16e3e", "mnist-bptt-99c76fc9ae", "mnist-autodiff-451866acfd",
            "digits-synthetic-28874a4ba2", "digits-bptt-a142b6e754", "digits-autodiff-613d4dba52"],
    "dni-quick": ["synthetic-bd8c1a93dd", "bptt-cb0586223b", "autodiff-ad89b4439c"],
    "moons": ["h3-act_tanh-158d3932a4", "h3-act_sigmoid-2f3251fbca", "h3-act_relu-cf9c8aebe8",
              "h5-act_tanh-c8df0ce70e", "h5-act_sigmoid-6248e5be9b", "h5-act_relu-e54c2edf13",
              "h8-act_tanh-94fe279f7e", "h8-act_sigmoid-5a60f3f809", "h8-act_relu-30e7e8ca88",
              "h50-act_tanh-b437c82de6", "h50-act_sigmoid-ea05305853", "h50-act_relu-80127eb1cd",
              "deep-act_tanh-2419ab0dfc", "deep-act_sigmoid-466eb842fa", "deep-act_relu-de8e8bf3b7"],
    "moons-quick": ["tanh-h3-706312a773", "relu-h50-6a2d3e4aa5", "deep-f72374abef"],
    "feedback-quick": ["bp-e47571560c", "fa-a8da29166f", "dfa-5d01688b13", "sign-db56be01ee",
                       "sign-frsf-dd54c17e1c", "kp-1f80354133"],
    "feedback": ["bp-s1-b631c6f800", "bp-s2-923c4a29a8", "bp-s3-87e9851b03", "bp-s4-1663d280a0",
                 "bp-s5-428f4d116c", "fa-s1-e876d42822", "fa-s2-a833602b20", "fa-s3-89b3b41a19",
                 "fa-s4-2a75c290ce", "fa-s5-f45451c0c2", "dfa-s1-d2b6cb1837", "dfa-s2-ee937b439a",
                 "dfa-s3-82e330c1f2", "dfa-s4-bc12c4260a", "dfa-s5-ceecff0a8e", "sign-s1-2e1c0dbc28",
                 "sign-s2-e9ae1d43d5", "sign-s3-2f55923abd", "sign-s4-91c51d6245", "sign-s5-70034cf472",
                 "kp-s1-d3a76945ce", "kp-s2-7c43be8ca0", "kp-s3-7755dfa607", "kp-s4-9065913fe6",
                 "kp-s5-1b4b791b72", "kp-wd-s1-52ca4fcc99", "kp-wd-s2-f08383efbd", "kp-wd-s3-096540edc0",
                 "kp-wd-s4-644d1a2cd3", "kp-wd-s5-35a7669cfd"],
})

def ids_of(suite) -> list[str]:
    """The ids of a suite's cases as PINNED_IDS holds them."""
    if all(case.settings.data.name in EMBEDDED for case in suite.cases):
        return [p.case_id for p in plan.make_plan(suite, plan.load_data(suite.cases), cpus_per_case=1, gpus_per_case=0)]
    return [case.case_id("") for case in suite.cases]



def write(tmp_path, text: str, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.timeout(120)
def test_every_builtin_suite_is_pinned():
    assert set(PINNED_IDS) == set(suites.builtin_names()), "a new built-in suite: pin its ids in PINNED_IDS"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(PINNED_IDS))
def test_builtin_ids_are_unchanged(name):
    ids = ids_of(suites.load_suite(name))
    assert ids == PINNED_IDS[name]
    assert all(STORAGE_NAME.match(case_id) for case_id in ids)


@pytest.mark.timeout(300)
def test_a_new_setting_changes_no_pinned_id(monkeypatch):
    """Settings added with a default, one of a case and one of its data, change no pinned id of
    any built-in suite (the suites are read and planned with the extended settings); a case that
    sets either one gets a new id."""
    from typing import Annotated

    from pydantic import BeforeValidator, create_model

    from workers import settings as settings_module

    data_plus = create_model("DataSpec", __base__=settings_module.DataSpec, crop=(int, 0))
    data_field = Annotated[data_plus, BeforeValidator(settings_module._data)]
    plus = create_model("CaseSettings", __base__=settings_module.CaseSettings, feedback_scale=(float, 1.0),
                        data=(data_field, data_plus()))
    monkeypatch.setattr(settings_module, "CaseSettings", plus)
    for name, pinned in PINNED_IDS.items():
        suite = suites.load_suite(name)
        assert all(type(case.settings) is plus and type(case.settings.data) is data_plus for case in suite.cases)
        assert {"feedback_scale", "data"} <= set(suite.cases[0].settings.to_dict())
        assert "crop" in suite.cases[0].settings.to_dict()["data"]
        assert ids_of(suite) == pinned, name
    case = suites.load_suite("quick").cases[0]
    for changed in (case.settings.model_copy(update={"feedback_scale": 0.5}),
                    case.settings.model_copy(update={"data": case.settings.data.model_copy(update={"crop": 2})})):
        assert changed.digest("fp") != case.settings.digest("fp")


@pytest.mark.timeout(60)
def test_names_of_awkward_grid_values_are_valid_unique_and_readable(tmp_path):
    path = write(tmp_path, """
name: awkward
defaults: {model: mlp, data: {name: moons, samples: 40}, epochs: 1}
grid: {seed: [1, 2]}
cases:
  rate: {grid: {lr: [1.0e-3, 0.5, 2, 1e-3]}}
  act: {grid: {activation: [tanh, relu]}}
  wide: {grid: {hidden: [[3], [8, 8]]}}
  bs: {grid: {batch_size: [16, 0]}}
  wd: {grid: {weight_decay: [0.0, 5.0e-5]}}
  aug: {grid: {data: [{name: moons, noise: 0.1}, {name: moons, noise: 0.3, samples: 50}]}}
""")
    suite = suites.load_suite(path)
    names = [c.name for c in suite.cases]
    assert len(names) == len(set(names)) == 2 * (4 + 2 + 2 + 2 + 2 + 2)
    assert all(STORAGE_NAME.match(n) for n in names), names
    # YAML reads 1.0e-3 as a float and 1e-3 as a string: both are kept apart
    assert {"rate-lr0.001-s1", "rate-lr1e-3-s1", "rate-lr0.5-s2", "rate-lr2-s1"} <= set(names)
    assert {"act-act_tanh-s1", "wide-h8x8-s2", "bs-bs16-s1", "bs-bs0-s1", "wd-wd5e-05-s1"} <= set(names)
    assert "aug-data_moons_noise0.3_samples50-s1" in names
    assert {c.group for c in suite.cases if c.name.startswith("act-act_tanh")} == {"act-act_tanh"}


@pytest.mark.timeout(30)
def test_labels_by_hand():
    label = suites.label
    assert label("seed", 3) == "s3"
    assert label("batch_size", 16) == "bs16"
    assert label("activation", "tanh") == "act_tanh"
    assert label("epochs", 5) == "ep5"
    assert label("lr", -0.5) == "lr-0.5"
    assert label("schedule", "unfair-back") == "unfair-back"
    assert label("schedule", "adversarial+dilated") == "adversarial_dilated"
    assert label("augment", True) == "augment" and label("augment", False) == "noaugment"
    assert label("note", "two words, and (more)") == "note_two_words_and_more"
    assert label("quirks", ["elu_derivative_two", "x y"]) == "quirks_elu_derivative_two.x_y"
    long = label("note", "x" * 200)
    assert len(long) == suites.MAX_LABEL and STORAGE_NAME.match(long) and long != label("note", "x" * 199)


@pytest.mark.timeout(30)
def test_look_alike_values_get_distinct_names():
    named = suites.case_names([("a", {"note": "b c", "seed": 1}), ("a", {"note": "b_c", "seed": 1}),
                               ("a", {"note": "b c", "seed": 2}), ("a-s1", {})])
    names = [n for n, _ in named]
    assert len(set(names)) == 4 and all(STORAGE_NAME.match(n) for n in names)
    # seeds of one setting stay in one group; the two look-alike settings do not share one
    assert named[0][1] == named[2][1] != named[1][1]


@pytest.mark.timeout(30)
def test_naming_is_linear_time():
    def seconds(n):
        points = [("case", {"lr": i * 1e-4, "seed": i % 7}) for i in range(n)]
        started = time.perf_counter()
        named = suites.case_names(points)
        assert len({name for name, _ in named}) == n
        return time.perf_counter() - started

    seconds(1000)  # warm up
    small = min(seconds(3000) for _ in range(3))  # best of three: a shared machine is noisy
    large = min(seconds(30000) for _ in range(3))
    assert large < 40 * small + 1.0, (small, large)  # linear: ~10x; quadratic: ~100x


@pytest.mark.timeout(30)
def test_a_point_listed_twice_is_a_one_line_error(tmp_path):
    path = write(tmp_path, "defaults: {model: mlp, data: {name: moons}}\ngrid: {seed: [1, 1]}\ncases: {a: {}}\n")
    with pytest.raises(SuiteError, match="both named 'a-s1'"):
        suites.load_suite(path)


@pytest.mark.timeout(30)
def test_a_case_name_outside_the_alphabet_is_refused(tmp_path):
    path = write(tmp_path, "defaults: {model: mlp, data: {name: moons}}\ncases: {a+b: {}}\n")
    with pytest.raises(SuiteError, match="case a\\+b: a case name may hold letters"):
        suites.load_suite(path)


@pytest.mark.timeout(60)
def test_only_takes_names_groups_and_globs():
    suite = suites.load_suite("moons")
    pick = lambda *only: [c.name for c in suites.select(suite, list(only)).cases]  # noqa: E731
    assert pick("h3-act_tanh") == ["h3-act_tanh"]
    assert pick("h5-*") == ["h5-act_tanh", "h5-act_sigmoid", "h5-act_relu"]
    assert pick("*-act_relu", "deep-act_relu") == ["h3-act_relu", "h5-act_relu", "h8-act_relu", "h50-act_relu",
                                                  "deep-act_relu"]
    assert pick("h?-act_sig*") == ["h3-act_sigmoid", "h5-act_sigmoid", "h8-act_sigmoid"]
    with pytest.raises(SuiteError) as error:
        suites.select(suite, ["h3-act_tanh", "h4*"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("--only h4*: matches no case") and "h3-act_tanh" in message


@pytest.mark.timeout(60)
def test_only_picks_a_group_of_seeds(tmp_path):
    path = write(tmp_path, """
defaults: {model: mlp, data: {name: moons}}
grid: {seed: [1, 2]}
cases:
  slow: {lr: 0.0005}
  fast: {lr: 0.008, grid: {batch_size: [16, 64]}}
""")
    suite = suites.load_suite(path)
    assert [c.name for c in suite.cases] == ["slow-s1", "slow-s2", "fast-bs16-s1", "fast-bs64-s1", "fast-bs16-s2",
                                             "fast-bs64-s2"]
    assert [c.name for c in suites.select(suite, ["fast-bs16"]).cases] == ["fast-bs16-s1", "fast-bs16-s2"]
    assert [c.name for c in suites.select(suite, ["fast*"]).cases] == ["fast-bs16-s1", "fast-bs64-s1", "fast-bs16-s2",
                                                                       "fast-bs64-s2"]

