"""deploy.local's processes: a group whose leader was reaped and whose number a new process
has taken is not ours to signal (pids wrap at 32768 here, several times a day of tests); the
Flower command scripts are never truncated under a process that is reading them."""

import signal
import subprocess
import sys
import time

from deploy.local import group_left, stop_group, write_flower_commands


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


def test_command_scripts_are_replaced_whole_and_only_when_they_change(tmp_path):
    """Every spawn writes the scripts again; a node started a moment before may be reading
    one, and a script truncated under its shell runs as an empty one (exit 0, no output)."""
    bin_dir = write_flower_commands(tmp_path / "bin")
    script = bin_dir / "flower-supernode"
    first = script.stat()
    write_flower_commands(bin_dir)
    assert script.stat().st_ino == first.st_ino and script.stat().st_mtime_ns == first.st_mtime_ns, "rewritten"
    script.write_text("#!/bin/sh\necho stale\n")  # another interpreter's, say
    with open(script) as reading:  # a shell that opened it just before
        write_flower_commands(bin_dir)
        assert reading.read() == "#!/bin/sh\necho stale\n", "the reader's file was truncated"
    assert "from flwr" in script.read_text() and script.stat().st_mode & 0o111
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-500:]
    assert not [p.name for p in bin_dir.iterdir() if p.name.startswith(".")], "a file left aside"
