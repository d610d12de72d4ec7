"""Every example in README.md and clients/python/README.md runs as written against a real server.

The shell blocks (```sh, ```bash) and Python blocks (```python) of both files are run, each in a fresh
folder holding the two pictures the examples name, ``photo.jpg`` and ``mask.png``, against a server on the
embedded models. A block that needs what a test cannot have (a model download) is skipped only where the
README says so: an HTML comment right before it, ``<!-- not run by tests: the reason -->``.

A shell block runs as one ``bash -e`` script, so a variable one line sets (``uuid=$(imagewire upload …)``)
serves the next. Of its lines, only these are left out:

- ``pip install …`` (the rest of such a line included): the test environment already has what they install,
  and the README's test command is the one CI runs (.ci/run);
- starting the server (``python -m imagewire.server``, ``imagewire-server``): the test starts its own, on the
  same settings as the command's (the server's start is what the server's own tests cover);
- ``export IMAGEWIRE_URL=…`` and ``export IMAGEWIRE_API_KEY=…``: the test sets both for its server.

Every other line must be an ``imagewire`` command (alone, or as ``NAME=$(imagewire …)``); any other line
fails the test, so that nothing in a README goes unrun unnoticed. Each ``imagewire`` command must exit 0
and print something, and the ones that write images must have written them.

A Python block runs as a script, with one substitution: the server URL the examples name,
``ws://127.0.0.1:8080/v1``, becomes the test server's (the key comes from ``IMAGEWIRE_API_KEY``, as the
examples read it). It must exit 0 and print something or write a file.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.timing import seconds
from tests.wire import API_KEY

ROOT = Path(__file__).resolve().parents[2]
READMES = (ROOT / "README.md", ROOT / "clients" / "python" / "README.md")
EXAMPLE_URL = "ws://127.0.0.1:8080/v1"
SKIP_MARKER = "<!-- not run by tests:"
SHELLS = ("sh", "bash")
FENCE = re.compile(r"^```(\S*)")
# The commands whose stdout lines are paths of images they wrote.
WRITES_IMAGES = {"generate", "preprocess", "upscale", "remove-background"}


@dataclass(frozen=True)
class Block:
    readme: Path
    line: int            # of the opening fence, 1-based
    language: str
    text: str
    skipped_because: str | None

    @property
    def name(self) -> str:
        return f"{self.readme.relative_to(ROOT)}:{self.line}"


def blocks(readme: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the reason it is not run, if it has one."""
    found = []
    lines = readme.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(end for end in range(index + 1, len(lines)) if lines[end].startswith("```"))
        before = [line for line in lines[:index] if line.strip()]
        comment = before[-1].strip() if before else ""
        reason = comment.removeprefix(SKIP_MARKER).removesuffix("-->").strip() \
            if comment.startswith(SKIP_MARKER) else None
        found.append(Block(readme, index + 1, opening.group(1).lower(), "\n".join(lines[index + 1:end]), reason))
        index = end + 1
    return found


EXAMPLES = [block for readme in READMES for block in blocks(readme) if block.language in (*SHELLS, "python")]


def logical_lines(script: str) -> list[str]:
    """The script's lines, each continued line (ending in a backslash) joined to the next."""
    joined: list[str] = []
    pending = ""
    for line in script.splitlines():
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        joined.append(pending + line)
        pending = ""
    return joined


def runnable(line: str) -> str | None:
    """The line as the test runs it, or None where the module docstring says it is left out."""
    command = line.strip()
    if not command or command.startswith("#"):
        return None
    if command.startswith("pip install "):
        return None
    if command.startswith(("python -m imagewire.server", "imagewire-server")):
        return None
    if re.match(r"export IMAGEWIRE_(URL|API_KEY)=", command):
        return None
    if re.match(r"(\w+=\$\()?imagewire\s", command):
        return command
    raise AssertionError(f"a README line the test does not know how to run: {line!r}; make it an imagewire "
                         f"command, or mark its block with {SKIP_MARKER} REASON -->")


def example_pictures(folder: Path) -> None:
    """The files the examples name: a photo and a mask of the same size (white: repaint)."""
    photo = Image.linear_gradient("L").resize((128, 128)).convert("RGB")
    ImageDraw.Draw(photo).ellipse((24, 24, 104, 104), fill=(200, 120, 40))
    photo.save(folder / "photo.jpg", quality=90)
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((48, 48, 80, 80), fill=255)
    mask.save(folder / "mask.png")


# Each imagewire command of a block, run through this function: it records the arguments and the output,
# so the test can check what every command printed and wrote; a failing command still stops the script.
RECORDER = r'''set -eo pipefail
imagewire() {
    local call
    call="$README_CALLS/$(printf '%03d' "$(find "$README_CALLS" -name '*.args' | wc -l)")"
    printf '%s\0' "$@" > "$call.args"
    "$README_PYTHON" -m imagewire_client.cli "$@" | tee "$call.out"
}
'''


async def run(*command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    # asyncio's subprocess keeps the event loop (and the server on it) running meanwhile.
    process = await asyncio.create_subprocess_exec(*command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds(300))
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def environment(url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEWIRE_")}
    return {**env, "IMAGEWIRE_URL": url, "IMAGEWIRE_API_KEY": API_KEY, **extra}


def test_the_readmes_have_the_examples_this_test_runs():
    for readme in READMES:
        languages = {block.language for block in EXAMPLES if block.readme == readme and not block.skipped_because}
        assert "python" in languages and languages & set(SHELLS), f"{readme} has shell and Python examples"
    assert any(block.language == "python" and "from runware import" in block.text and block.skipped_because is None
               for block in EXAMPLES), "README.md's Runware SDK example is run"
    assert any(block.skipped_because for block in EXAMPLES), "the SD-Turbo example is marked as not run"
    assert all(block.skipped_because for block in EXAMPLES if "runware:101@1" in block.text or "sd-turbo" in block.text)


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda block: block.name)
async def test_readme_example_runs_as_written(block: Block, start_server, tmp_path: Path):
    if block.skipped_because is not None:
        pytest.skip(f"the README says: not run by tests: {block.skipped_because}")
    work = tmp_path / "work"
    work.mkdir()
    example_pictures(work)
    before = set(work.iterdir())
    server = await start_server()
    if block.language == "python":
        assert EXAMPLE_URL in block.text, f"{block.name}: the example names no server at {EXAMPLE_URL}"
        script = work.parent / "example.py"
        script.write_text(block.text.replace(EXAMPLE_URL, server.url), encoding="utf-8")
        code, stdout, stderr = await run(sys.executable, str(script), cwd=work, env=environment(server.url))
        assert code == 0, f"{block.name} failed:\n{stderr[-4000:]}"
        assert stdout.strip() or set(work.iterdir()) - before, f"{block.name} printed and wrote nothing"
        return

    commands = [command for line in logical_lines(block.text) if (command := runnable(line)) is not None]
    if not commands:  # installation only: nothing against the server
        return
    calls = tmp_path / "calls"
    calls.mkdir()
    script = RECORDER + "\n".join(commands) + "\n"
    env = environment(server.url, README_CALLS=str(calls), README_PYTHON=sys.executable)
    code, _, stderr = await run("bash", "-c", script, cwd=work, env=env)
    assert code == 0, f"{block.name} failed:\n{script}\n{stderr[-4000:]}"
    recorded = sorted(calls.glob("*.args"))
    assert len(recorded) == len(commands), f"{block.name}: {len(commands)} commands, {len(recorded)} ran"
    for args_file in recorded:
        args = args_file.read_text().split("\0")[:-1]
        printed = args_file.with_suffix(".out").read_text().splitlines()
        shown = shlex.join(["imagewire", *args])
        assert printed, f"{shown} printed nothing"
        if args[0] in WRITES_IMAGES:
            for path in printed:
                with Image.open(work / path) as image:
                    image.load()
                    assert image.width >= 128 and image.height >= 128, f"{shown} wrote {path} at {image.size}"


def test_a_line_the_test_cannot_run_fails_it_and_a_marked_block_is_skipped(tmp_path: Path):
    assert logical_lines("imagewire generate \\\n    --model m\n# done") == ["imagewire generate     --model m",
                                                                             "# done"]
    assert runnable('guide=$(imagewire preprocess photo.jpg)') == "guide=$(imagewire preprocess photo.jpg)"
    assert runnable("pip install ./clients/python") is None
    with pytest.raises(AssertionError, match="does not know how to run"):
        runnable("curl -s http://127.0.0.1:8080/health")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- not run by tests: needs FLUX -->\n\n```sh\nimagewire models\n```\n\n"
                      "```python\nprint(1)\n```\n")
    marked, plain = blocks(readme)
    assert (marked.language, marked.skipped_because, marked.text) == ("sh", "needs FLUX", "imagewire models")
    assert (plain.language, plain.skipped_because, plain.line) == ("python", None, 7)
