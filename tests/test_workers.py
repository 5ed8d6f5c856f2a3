"""-j N worker processes never outlive the main process: a closed stdout (| head), Ctrl-C,
an error in the caller, a Model dropped without close(), even the main process killed.
Each case runs in its own process; afterwards no process of this test's model file runs
`matmul_worker`, and nothing was printed but what the case expects.

Run: python3 -m unittest tests.test_workers -v
"""
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import gguf_writer as gw  # noqa: E402

PICOLM = os.path.join(ROOT, "picolm.py")
TMP = MODEL = None


def setUpModule():
    global TMP, MODEL
    TMP = gw.fast_tmpdir("picolm-test-workers-")
    MODEL = os.path.join(TMP, "tiny.gguf")
    gw.make_tiny_llama(MODEL, "Q8_0", n_ctx_train=2048, seed=3)


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def workers_running():
    """pids of matmul workers of this test's model (other test runs may have their own)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"matmul_worker" in cmdline and MODEL.encode() in cmdline:
            found.append(int(pid))
    return found


def default_ctrl_c():
    """In the child: SIGINT as a terminal delivers it. A shell script's background job
    (as .ci/run starts the suites) inherits SIGINT ignored, and so would picolm."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def api_script(body):
    """python -c code that opens the test model with two processes, then runs body."""
    return ("import sys; sys.path.insert(0, %r); import picolm\n"
            "model = picolm.Model(%r, threads=2, accelerate=False, pack='off')\n"
            "assert len(model.matmul.workers) == 1\n%s" % (ROOT, MODEL, body))


@unittest.skipUnless(os.path.isdir("/proc"), "needs /proc to list processes")
class WorkersTest(unittest.TestCase):

    def assertNoWorkers(self):
        deadline = time.monotonic() + 10  # a worker sees its pipe close and exits
        while workers_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(workers_running(), [])

    def start_cli(self):
        """A long -j 2 generation, once it has printed its first text."""
        proc = subprocess.Popen(
            [sys.executable, PICOLM, MODEL, "-j", "2", "--no-accel", "--pack", "off",
             "-c", "2048", "-n", "2000", "-t", "1.0", "-s", "1", "-p", "hello"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            preexec_fn=default_ctrl_c)
        self.assertTrue(proc.stdout.read(1), "no text was generated")
        self.assertTrue(workers_running(), "the worker did not start")
        return proc

    def test_closed_stdout(self):
        proc = self.start_cli()
        proc.stdout.close()  # as `| head -c 1` does
        stderr = proc.communicate(timeout=120)[1].decode()
        self.assertEqual(proc.returncode, 141, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertNoWorkers()

    def test_ctrl_c(self):
        proc = self.start_cli()
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1].decode()
        self.assertEqual(proc.returncode, 130, stderr)
        self.assertIn("picolm: interrupted", stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertNoWorkers()

    def run_api(self, body):
        return subprocess.run([sys.executable, "-c", api_script(body)], capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    def test_model_dropped_without_close(self):
        result = self.run_api("print(model.eval_greedy([1, 2, 3]))")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")  # no complaint about the shared block
        self.assertNoWorkers()

    def test_error_in_the_caller(self):
        result = self.run_api("model.eval([1, 2])\nraise RuntimeError('the caller failed')")
        self.assertEqual(result.returncode, 1)
        self.assertIn("RuntimeError: the caller failed", result.stderr)
        self.assertNoWorkers()

    def test_main_process_killed(self):
        result = self.run_api("import os, signal\nmodel.eval([1, 2])\n"
                              "os.kill(os.getpid(), signal.SIGKILL)")
        self.assertEqual(result.returncode, -signal.SIGKILL)
        self.assertNoWorkers()


if __name__ == "__main__":
    unittest.main()
