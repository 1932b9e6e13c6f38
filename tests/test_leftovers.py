"""Every temp name flexorch makes is matched by the pattern that cleans it up, with this process's pid."""

import os
import tempfile
from pathlib import Path

from flexorch.contract.leftovers import (ACTIVATIONS, TASKS, atomic_temp, atomic_temps, prepare_build_dir,
                                         prepare_old_dir, prepare_temps, remove_dead)


def test_each_made_name_is_matched_by_its_pattern_with_our_pid(tmp_path):
    made = [(atomic_temp(tmp_path / "out.pkl").name, atomic_temps("out.pkl")),
            (atomic_temp(tmp_path / "out.pkl").name, atomic_temps()),
            (prepare_build_dir(tmp_path / "m.layers").name, prepare_temps("m.layers")),
            (prepare_old_dir(tmp_path / "m.layers").name, prepare_temps()),
            (Path(tempfile.mkdtemp(prefix=ACTIVATIONS.prefix(), dir=tmp_path)).name, ACTIVATIONS),
            (Path(tempfile.mkdtemp(prefix=TASKS.prefix(), dir=tmp_path)).name, TASKS)]
    for name, pattern in made:
        match = pattern.match(name)
        assert match is not None and int(match[1]) == os.getpid(), name
    assert atomic_temps("other.pkl").match(made[0][0]) is None and TASKS.match(made[4][0]) is None


def test_only_the_dirs_of_dead_owners_are_removed(tmp_path):
    dead = 2**31 - 2  # above any pid handed out: never alive
    gone, mine = tmp_path / f"activations-{dead}-x", Path(tempfile.mkdtemp(prefix=ACTIVATIONS.prefix(), dir=tmp_path))
    gone.mkdir()
    assert remove_dead(tmp_path, ACTIVATIONS) == [gone] and mine.exists()
