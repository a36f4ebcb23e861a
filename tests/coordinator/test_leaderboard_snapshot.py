"""A leaderboard is read by several statements; each may see an evaluation commit between
them. So a version counts as evaluated only once its evaluation is recorded as done
(evaluated_at, set in the evaluation's own transaction): before that its board is empty,
never half of one, and nothing is read or cached for it."""

from coordinator.models import Forest, ForestVersion
from coordinator.services import leaderboard


class NoDatabase:
    def __getattr__(self, name):
        raise AssertionError(f"the board of an unevaluated version read the database ({name})")


def test_an_unevaluated_version_has_an_empty_board_and_no_posteriors():
    v = ForestVersion(id=7, number=2, forest=Forest(name="ff"), evaluated_at=None)
    b = leaderboard.board(NoDatabase(), v, sort="mean", page=1, per_page=50)
    assert (b.forest, b.version, b.domains, b.subjects, b.cells, b.total) == ("ff", 2, [], [], {}, 0)
    assert leaderboard.posteriors(NoDatabase(), v) == {}
