import pandas as pd
import pytest

from perplib import paths
from perplib.claims import Claim, claims_frame, combine_claims, save_claims


def _claim(id="C1", holds=True, **kw):
    return Claim(id=id, claim="magnitude collapses", source="Section 3.3", paper="265", ours="278", holds=holds, **kw)


def test_frame_marks_holds_fails_and_unmeasured():
    frame = claims_frame([_claim("C1", True), _claim("C2", False), _claim("C3", None, rule="ppl > 10x dense")])
    assert list(frame.holds) == ["✓", "✗", "–"]
    assert list(frame.columns) == ["id", "claim", "source", "paper", "ours", "rule", "holds"]
    assert frame.rule.iloc[2] == "ppl > 10x dense"


@pytest.mark.parametrize(
    "bad, match",
    [({"id": " "}, "non-empty id"), ({"holds": "yes"}, "holds must be"), ({"claim": ""}, "non-empty claim")],
)
def test_bad_claims_are_refused(bad, match):
    values = {"id": "C1", "claim": "x", "source": "s", "paper": "p", "ours": "o", "holds": True} | bad
    with pytest.raises(ValueError, match=match):
        Claim(**values)


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        claims_frame([_claim("C1"), _claim("C1")])


def test_notebook_tables_combine_in_name_order():
    save_claims([_claim("C2", False)], "33_magnitude_llms", "unit")
    save_claims([_claim("C1", True)], "32_efficient_retraining", "unit")
    out = combine_claims("unit")
    combined = pd.read_csv(out["csv"], dtype=str, keep_default_na=False)
    assert list(combined.notebook) == ["32_efficient_retraining", "33_magnitude_llms"]
    assert list(combined.holds) == ["✓", "✗"]
    assert (paths.tables_dir() / "unit" / "claims.md").read_text().count("✓") == 1
    assert combine_claims("empty-profile") is None
