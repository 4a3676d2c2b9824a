"""``natterctl call`` (a tone) and ``natterctl answer`` (playing a WAV file) against a
running natterd, each in its own thread (the commands run their own event loop), both
recording what they hear to WAV files."""

from __future__ import annotations

import asyncio
import re
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.harness import add_user, running_server
from voip.softphone import dominant_frequency
from xmpp_server.cli import ctl_main
from xmpp_server.jid import JID

DEADLINE = 25.0


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 48000)
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return data.astype(np.float64) / 32768


def write_tone(path: Path, frequency: float, *, seconds: float, rate: int = 44100) -> None:
    t = np.arange(int(seconds * rate)) / rate
    data = (0.3 * 32767 * np.sin(2 * np.pi * frequency * t)).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(data.tobytes())


async def test_natterctl_call_and_answer(
    sqlite_migrated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "natter.db"
    shutil.copyfile(sqlite_migrated, db)
    url = f"sqlite+aiosqlite:///{db}"
    async with running_server(url, tmp_path) as server:
        await add_user(server, "alice")
        await add_user(server, "bob")
        config = tmp_path / "natterctl.toml"
        config.write_text(
            f'[server]\ndomain = "localhost"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[storage]\nurl = "{url}"\n'
            f'[c2s]\nhost = "127.0.0.1"\nport = {server.c2s_port}\n',
            encoding="utf-8",
        )
        password = tmp_path / "password"
        password.write_text("correct horse\n", encoding="utf-8")
        common = ["--password-file", str(password), "--timeout", str(DEADLINE)]
        tone_file = tmp_path / "tone660.wav"
        write_tone(tone_file, 660.0, seconds=5.0)

        def ctl(*args: str) -> int:
            return ctl_main(["--config", str(config), *args])

        answering = asyncio.create_task(
            asyncio.to_thread(
                ctl, "answer", "--as", "bob@localhost", "--play", str(tone_file),
                "--record", str(tmp_path / "bob.wav"), *common,
            )
        )  # fmt: skip
        async with asyncio.timeout(DEADLINE):
            while not server.host.router.available(JID.parse("bob@localhost")):
                await asyncio.sleep(0.05)
        calling = asyncio.to_thread(
            ctl, "call", "bob@localhost", "--as", "alice@localhost", "--tone", "440",
            "--duration", "1.5", "--record", str(tmp_path / "alice.wav"), *common,
        )  # fmt: skip
        async with asyncio.timeout(DEADLINE * 2):
            assert await calling == 0
            assert await answering == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2 and all("ended: success" in line for line in out), out
        # Each reports the ICE pair its media took: host to host on this machine.
        assert all(re.search(r"; ice: host \S+ -> host \S+", line) for line in out), out
        # The recordings include the jitter buffer's start: skip the first half second.
        bob_heard = read_wav(tmp_path / "bob.wav")[24000:]
        alice_heard = read_wav(tmp_path / "alice.wav")[24000:]
        assert len(bob_heard) > 24000 and len(alice_heard) > 24000
        assert dominant_frequency(bob_heard) == pytest.approx(440.0, abs=5)
        assert dominant_frequency(alice_heard) == pytest.approx(660.0, abs=5)


def test_natterctl_call_needs_an_account(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_main(["call", "bob@localhost"]) == 2
    assert "--as" in capsys.readouterr().err
