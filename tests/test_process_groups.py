"""deploy.local's process-group handling: a group whose leader was reaped and whose number a
new process has taken is not ours to signal (pids wrap at 32768 here, several times a day of
tests)."""

import signal
import subprocess
import sys
import time

from deploy.local import group_left, stop_group


def spawn(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"], start_new_session=True)


class ReapedLeader:
    """A component whose leader exited and was reaped (Popen.wait), as `check_alive` and a
    test's `wait_exit` leave it, at the moment its pid number belongs to another process."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, 0

    def poll(self):
        return self.returncode


def test_a_reaped_leaders_number_taken_by_another_group_is_left_alone():
    stranger = spawn(60)  # a group leader that happens to have the number
    try:
        ours = ReapedLeader(stranger.pid)
        assert not group_left(ours)
        stop_group(ours, grace_s=1.0)
        time.sleep(0.2)
        assert stranger.poll() is None, "stop_group signalled a group that was not its own"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_live_group_is_stopped_and_a_finished_one_is_not_signalled():
    running = spawn(60)
    assert group_left(running)
    stop_group(running, grace_s=5.0)
    assert running.returncode == -signal.SIGTERM and not group_left(running)
    finished = spawn(0)
    finished.wait()
    assert not group_left(finished)
    stop_group(finished)  # nothing to do, nothing raised
    assert finished.returncode == 0
