"""Chapter 05 prints the torchrun command a user pastes into a shell: over lines that fit the
page, each continued with a backslash, and the very command that one line would be."""
import shlex
import subprocess

from emq.book.full_scale import full_scale_config, torchrun_line, wrap_command


def test_the_wrapped_command_fits_the_width_and_is_the_same_command():
    cfg = full_scale_config("gpu", "/data/imagenet")
    one = torchrun_line(cfg, 8, "results")
    wrapped = torchrun_line(cfg, 8, "results", width=76)
    lines = wrapped.splitlines()
    assert len(one) > 300 and len(lines) > 4
    assert all(len(line) <= 76 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert shlex.split(wrapped.replace(" \\\n", " ")) == shlex.split(one)
    # a shell joins the continued lines into the same arguments
    echoed = subprocess.run(["bash", "-c", "printf '%s\\n' " + wrapped], capture_output=True, text=True, check=True)
    assert echoed.stdout.splitlines() == shlex.split(one)


def test_an_option_keeps_its_value_and_a_long_argument_keeps_its_own_line():
    text = wrap_command(["torchrun", "--set", "a=1", "--set", "x" * 90, "--no-progress"], width=30)
    assert text.splitlines()[0] == "torchrun --set a=1 \\"
    assert text.splitlines()[1].strip() == "--set " + "x" * 90 + " \\"
    assert text.splitlines()[2].strip() == "--no-progress"
