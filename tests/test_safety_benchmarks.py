"""The safety benchmarks shipped in the package: the files as their sources publish them, with their licences,
and fixed splits that cover each benchmark once."""

import hashlib
import os

import pytest

from ssae_kernels.data import safety_benchmarks as sb

SHA256 = {"advbench_harmful_behaviors.csv": "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
          "xstest_prompts.csv": "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a"}


def test_the_files_are_the_published_ones_with_their_licences():
    for name, digest in SHA256.items():
        with open(os.path.join(sb.DIRECTORY, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    licences = os.listdir(os.path.join(sb.DIRECTORY, "LICENSES"))
    assert sorted(licences) == ["advbench_llm-attacks_MIT.txt", "xstest_CC-BY-4.0.txt"]
    attribution = open(os.path.join(sb.DIRECTORY, "ATTRIBUTION.md")).read()
    assert "CC BY 4.0" in attribution and "MIT" in attribution and "NAACL 2024" in attribution


def test_row_counts():
    assert len(sb.advbench_rows()) == 520 and len(set(sb.advbench_rows())) == 520
    assert len(sb.xstest_rows("safe")) == 250 and len(sb.xstest_unsafe()) == 200
    with pytest.raises(ValueError, match="label must be"):
        sb.xstest_rows("maybe")


def test_the_stored_splits_are_the_seeded_ones_and_cover_each_benchmark_once():
    import json

    with open(sb.SPLITS_FILE) as f:
        stored = json.load(f)
    assert stored == sb.make_splits()
    for name, sizes in sb.SIZES.items():
        parts = [stored[name][split] for split in sb.SPLITS]
        assert [len(p) for p in parts] == list(sizes)
        assert sorted(i for p in parts for i in p) == list(range(sum(sizes)))
    assert sb.make_splits(seed=1) != stored  # the seed matters
    test, train = set(sb.advbench("test")), set(sb.advbench("train"))
    assert len(test) == 160 and not test & train and not set(sb.xstest_safe("test")) & set(sb.xstest_safe("dev"))
    assert not set(sb.xstest_unsafe()) & set(sb.xstest_rows("safe"))
    with pytest.raises(ValueError, match="split must be one of"):
        sb.advbench("validation")
