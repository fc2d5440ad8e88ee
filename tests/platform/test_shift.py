import colorsys

import numpy as np
import pytest
import torch

from nestune import forward_select
from nestune.metrics import ece, nll
from nestune.platform import shift as S
from nestune.platform.data import DataBundle, Split, load_data


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits")


def _rgb(n=6, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images so blur and pixelate have something to remove
    base = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("name", S.SHIFT_DEFAULT)
def test_every_corruption_keeps_shape_and_range_and_grows_with_severity(name):
    x = _rgb()
    diffs = []
    for sev in range(6):
        y = S.corrupt(x, name, sev, seed=3)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        diffs.append(float((y - x).abs().mean()))
    assert diffs[0] == 0.0
    assert diffs[5] > diffs[1] > 0.0
    # grayscale 8x8 (digits-sized) works too
    g = S.corrupt(x[:, :1, :8, :8].contiguous(), name, 5, seed=3)
    assert g.shape == (6, 1, 8, 8)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise"])
def test_noise_is_deterministic_from_the_seed_and_leaves_global_rng_alone(name):
    x = _rgb()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = S.corrupt(x, name, 3, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's stream was not consumed
    b = S.corrupt(x, name, 3, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, S.corrupt(x, name, 3, seed=8))
    # each severity has its own stream
    assert not torch.equal(S.corrupt(x, name, 4, seed=7) - x, (a - x) * 0.09 / 0.08)


def test_gaussian_noise_has_the_cifar_c_sigma():
    x = torch.full((20, 3, 32, 32), 0.5)
    y = S.corrupt(x, "gaussian_noise", 5, seed=0)
    assert float((y - x).std()) == pytest.approx(0.10, rel=0.03)
    assert float((y - x).mean()) == pytest.approx(0.0, abs=2e-3)


def test_shot_noise_is_poisson_around_the_image():
    x = torch.full((20, 3, 32, 32), 0.4)
    y = S.corrupt(x, "shot_noise", 5, seed=0)  # 50 photons
    assert float(y.mean()) == pytest.approx(0.4, abs=5e-3)
    assert float(y.var()) == pytest.approx(0.4 / 50, rel=0.05)


def test_brightness_adds_to_the_hsv_value():
    x = _rgb(n=2, size=8)
    y = S.corrupt(x, "brightness", 3, seed=0)  # +0.15
    for n, i, j in [(0, 0, 0), (1, 3, 5), (0, 7, 2)]:
        r, g, b = (float(v) for v in x[n, :, i, j])
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        ref = colorsys.hsv_to_rgb(h, s, min(v + 0.15, 1.0))
        np.testing.assert_allclose(y[n, :, i, j].numpy(), ref, atol=1e-5)
    black = S.corrupt(torch.zeros(1, 3, 4, 4), "brightness", 1, seed=0)
    assert torch.allclose(black, torch.full_like(black, 0.05))


def test_contrast_blends_towards_the_mean_on_grayscale():
    x = _rgb(n=3)[:, :1]
    y = S.corrupt(x, "contrast", 2, seed=0)  # factor .5
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, ((x - mean) * 0.5 + mean).clamp(0, 1), atol=1e-5, rtol=0)


def test_jpeg_and_pixelate_look_like_themselves():
    x = _rgb()
    j = S.corrupt(x, "jpeg", 5, seed=0)
    assert torch.allclose(j * 255, (j * 255).round(), atol=1e-3)  # on the uint8 grid
    p = S.corrupt(x, "pixelate", 5, seed=0)
    # fewer distinct columns in a row than pixels: blocks
    assert len(torch.unique(p[0, 0, 0])) < 32


def test_bad_input_names_the_argument():
    x = _rgb(n=1)
    with pytest.raises(ValueError, match="name"):
        S.corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        S.corrupt(x, "jpeg", 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.corrupt(x * 3 - 1, "jpeg", 1)
    with pytest.raises(ValueError, match="shape"):
        S.corrupt(x[0], "jpeg", 1)
    with pytest.raises(ValueError, match="seed"):
        S.corrupt(x, "gaussian_noise", 1, seed=-1)


def test_normalise_round_trip(digits):
    x = S.denormalise(digits.test.x, digits.mean, digits.std)
    assert float(x.min()) >= -1e-5 and float(x.max()) <= 1 + 1e-5
    torch.testing.assert_close(S.normalise(x, digits.mean, digits.std), digits.test.x)
    with pytest.raises(ValueError, match="mean"):
        S.normalise(x, (0.1, 0.2, 0.3), digits.std)


def test_shifted_split_is_normalised_like_the_data(digits):
    s = S.shifted_split(digits, "contrast", 0)
    torch.testing.assert_close(s.x, digits.test.x, atol=1e-5, rtol=0)
    assert torch.equal(s.y, digits.test.y)
    sub = S.shifted_split(digits, "gaussian_noise", 4, seed=1, subset=100)
    assert sub.x.shape == (100, 1, 8, 8) and torch.equal(sub.y, digits.test.y[:100])
    again = S.shifted_split(digits, "gaussian_noise", 4, seed=1, subset=100)
    assert torch.equal(sub.x, again.x)
    val = S.shifted_split(digits, "jpeg", 2, split="val", subset=50)
    assert torch.equal(val.y, digits.val.y[:50])
    with pytest.raises(ValueError, match="split"):
        S.shifted_split(digits, "jpeg", 2, split="holdout")
    bare = DataBundle("x", digits.train, digits.val, digits.test, 10, 1, (1, 8, 8), False)
    with pytest.raises(ValueError, match="mean/std"):
        S.shifted_split(bare, "jpeg", 1)


def test_predict_shifted_store_and_score(digits, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    sets = S.shifted_sets(digits, ["gaussian_noise"], [1], seed=0, subset=120)
    probs = S.predict_shifted(model, digits, "cpu", ["gaussian_noise", "pixelate"], [1, 5], seed=0,
                              subset=120, sets=sets)
    assert set(probs) == {("gaussian_noise", 1), ("gaussian_noise", 5), ("pixelate", 1), ("pixelate", 5)}
    for p in probs.values():
        assert p.shape == (120, 10) and p.dtype == np.float16
        np.testing.assert_allclose(p.astype(np.float64).sum(1), 1.0, atol=1e-2)
    path = S.save_shifted(tmp_path, probs)
    assert path.name == S.SHIFT_FILE
    back = S.load_shifted(tmp_path)
    assert set(back) == set(probs)
    np.testing.assert_array_equal(back[("pixelate", 5)], probs[("pixelate", 5)])
    assert S.load_shifted(tmp_path / "nothing") == {}

    # an "ensemble" of two members: the same model twice
    members = {k: np.stack([v, v]) for k, v in back.items()}
    clean = np.stack([np.full((len(digits.test), 10), 0.1)] * 2)
    df = S.shift_metrics(members, digits.test.y.numpy(), clean=clean)
    assert list(df["corruption"].unique()) == ["gaussian_noise", "pixelate"]
    assert sorted(df[df.corruption == "pixelate"]["severity"]) == [0, 1, 5]
    row = df[(df.corruption == "pixelate") & (df.severity == 5)].iloc[0]
    y = digits.test.y.numpy()[:120]
    assert row["nll"] == pytest.approx(nll(back[("pixelate", 5)], y))
    assert row["ece"] == pytest.approx(ece(back[("pixelate", 5)], y))
    zero = df[(df.corruption == "pixelate") & (df.severity == 0)].iloc[0]
    assert zero["nll"] == pytest.approx(np.log(10))


def test_forward_select_on_a_shifted_validation_split():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=40)
    pools = {}
    for key in [("jpeg", 1), ("contrast", 3)]:
        p = rng.dirichlet(np.ones(3), size=(5, 40))
        pools[key] = p
    got = S.forward_select_shifted(pools, y, 3)
    ref = forward_select(np.concatenate([pools[("jpeg", 1)], pools[("contrast", 3)]], axis=1),
                         np.concatenate([y, y]), 3)
    assert got == ref
    only = S.forward_select_shifted(pools, y, 2, keys=[("jpeg", 1)])
    assert only == forward_select(pools[("jpeg", 1)], y, 2)
    with pytest.raises(ValueError, match="keys"):
        S.forward_select_shifted(pools, y, 2, keys=[("fog", 1)])


def test_severity_summary_averages_corruptions_then_seeds():
    import pandas as pd

    rows = []
    for seed in range(2):
        for corr, base in (("jpeg", 0.1), ("contrast", 0.3)):
            for sev in range(3):
                rows.append({"strategy": "random", "seed": seed, "corruption": corr, "severity": sev,
                             "nll": base * (sev + 1) + seed, "error": 0.1, "ece": 0.0, "brier": 0.2})
    out = S.severity_summary(pd.DataFrame(rows))
    r = out[(out.strategy == "random") & (out.severity == 2)].iloc[0]
    assert r["nll_mean"] == pytest.approx((0.3 + 0.9) / 2 + 0.5)
    assert r["nll_std"] == pytest.approx(np.std([0.6, 1.6], ddof=1))


def test_split_class_is_what_predict_expects(digits):
    s = S.shifted_split(digits, "brightness", 2, subset=10)
    assert isinstance(s, Split) and s.x.dtype == torch.float32


def test_store_shifted_writes_test_and_shifted_validation_predictions(digits, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    paths = S.store_shifted(model, digits, tmp_path, "cpu", ["jpeg", "gaussian_noise"], [2, 5], seed=3,
                            subset=60, val_corruptions=["contrast"], val_subset=40)
    assert [p.name for p in paths] == [S.SHIFT_FILE, S.SHIFT_VAL_FILE]
    test = S.load_shifted(tmp_path)
    val = S.load_shifted(tmp_path, "val")
    assert set(test) == {("jpeg", 2), ("jpeg", 5), ("gaussian_noise", 2), ("gaussian_noise", 5)}
    assert set(val) == {("contrast", 2), ("contrast", 5)}
    assert test[("jpeg", 5)].shape == (60, 10) and val[("contrast", 5)].shape == (40, 10)
    ref = S.predict_shifted(model, digits, "cpu", ["gaussian_noise"], [5], seed=3, subset=60)
    np.testing.assert_array_equal(test[("gaussian_noise", 5)], ref[("gaussian_noise", 5)])
    # only the test file without val_corruptions; bad names are refused before any work
    other = tmp_path / "plain"
    assert [p.name for p in S.store_shifted(model, digits, other, corruptions=["jpeg"], severities=[1],
                                            subset=10)] == [S.SHIFT_FILE]
    assert S.load_shifted(other, "val") == {}
    with pytest.raises(ValueError, match="name"):
        S.store_shifted(model, digits, other, corruptions=["fog"])
    with pytest.raises(ValueError, match="val_corruptions"):
        S.store_shifted(model, digits, other, corruptions=["jpeg"], severities=[1], subset=10,
                        val_corruptions=[])
    with pytest.raises(ValueError, match="split"):
        S.load_shifted(other, "train")


def test_the_validation_copy_has_its_own_noise(digits):
    # same seed, same corruption: the val and test noise must not be the same draws
    t = S.shifted_split(digits, "gaussian_noise", 5, seed=0, subset=50)
    v = S.shifted_split(digits, "gaussian_noise", 5, seed=0, split="val", subset=50)
    raw = [S.denormalise(a, digits.mean, digits.std) for a in (t.x, v.x, digits.test.x[:50],
                                                               digits.val.x[:50])]
    # compare where neither copy was clipped: there identical streams would give equal noise
    inside = (raw[0] > 1e-3) & (raw[0] < 1 - 1e-3) & (raw[1] > 1e-3) & (raw[1] < 1 - 1e-3)
    assert int(inside.sum()) > 100
    t_noise, v_noise = (raw[0] - raw[2])[inside], (raw[1] - raw[3])[inside]
    assert float((t_noise - v_noise).abs().mean()) > 0.05
    again = S.shifted_split(digits, "gaussian_noise", 5, seed=0, split="val", subset=50)
    assert torch.equal(v.x, again.x)


def test_shift_options_complete_and_name_bad_fields():
    full = S.shift_options(True)
    assert full["corruptions"] == list(S.CORRUPTIONS) and full["severities"] == [1, 2, 3, 4, 5]
    assert full["val"] and full["val_corruptions"] == full["corruptions"] and full["subset"] is None
    assert S.shift_options(None) is None and S.shift_options(False) is None
    some = S.shift_options({"corruptions": ["jpeg"], "severities": [5, 1], "subset": 50, "val": False})
    assert some == {"corruptions": ["jpeg"], "severities": [1, 5], "subset": 50, "val": False,
                    "val_corruptions": None, "val_subset": None, "seed": 0}
    nes = S.shift_options({"corruptions": ["jpeg"], "val_corruptions": ["contrast"], "val_subset": 9})
    assert nes["val_corruptions"] == ["contrast"] and nes["val_subset"] == 9
    for bad, field in [("all", "shift"), ({"corruptions": []}, "shift.corruptions"),
                       ({"corruptions": ["jpeg", "jpeg"]}, "shift.corruptions"),
                       ({"corruptions": ["fog"]}, r"shift.corruptions\[0\]"),
                       ({"severities": [6]}, "shift.severities"),
                       ({"severities": [True]}, "shift.severities"),
                       ({"subset": 0}, "shift.subset"), ({"val": "yes"}, "shift.val"),
                       ({"seed": -1}, "shift.seed"), ({"sev": [1]}, "shift.sev")]:
        with pytest.raises(ValueError, match=field):
            S.shift_options(bad)


def test_store_member_shift_reuses_the_corrupted_copies(digits, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    options = S.shift_options({"corruptions": ["gaussian_noise"], "severities": [3], "subset": 30})
    S._SET_CACHE.clear()
    assert S.store_member_shift(model, digits, tmp_path / "a", options) > 0
    assert len(S._SET_CACHE) == 2  # the test and the validation copies
    cached = {k: id(v) for k, v in S._SET_CACHE.items()}
    S.store_member_shift(model, digits, tmp_path / "b", options)
    assert {k: id(v) for k, v in S._SET_CACHE.items()} == cached
    for split in ("test", "val"):
        a, b = S.load_shifted(tmp_path / "a", split), S.load_shifted(tmp_path / "b", split)
        assert list(a) == [("gaussian_noise", 3)]
        np.testing.assert_array_equal(a[("gaussian_noise", 3)], b[("gaussian_noise", 3)])
    # The same images as predict_shifted makes on its own, from the same seed.
    ref = S.predict_shifted(model, digits, "cpu", ["gaussian_noise"], [3], seed=0, subset=30)
    np.testing.assert_array_equal(S.load_shifted(tmp_path / "a")[("gaussian_noise", 3)],
                                  ref[("gaussian_noise", 3)])
