"""Importing the package without its built C extension says what to do."""
import subprocess
import sys


def test_unbuilt_extension_gives_instructions():
    code = ("import sys; sys.modules['routing_attention._ext'] = None\n"   # as if never built
            "import routing_attention")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install -e ." in proc.stderr and "outside the source tree" in proc.stderr, \
        proc.stderr[-600:]
