"""Batch job output, on the driver's side: records (encoded in the replicas by
``batch_record``) written exactly once.

Committed output is never rewritten. JSONL is append-only: each unit's records reach the OS in
one write (a killed driver loses none of them) and are fsynced at most once a second (a lost
machine can lose the last second, which a resume then redoes; it cannot tear a record into
another, since only bytes after the last newline are cut). On resume the
only repair is truncating a torn final line (bytes after the last newline, which no complete
record owns), so a crash during resume, even during that repair, cannot lose a complete record.
Parquet output is a folder of parts, each written to a temporary name and renamed into place.

Resume needs the set of lines already written, not the records: every JSONL record starts with
its line number (``batch_record.record_line``), so the scan reads a prefix per line, and the set
is a bitmap (1M lines: 125 KB).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vllm_prepack.batch_record import record_line

SYNC_EVERY_S = 1.0


class LineSet:
    """A set of line numbers as a bitmap."""

    def __init__(self):
        self.bits = bytearray()
        self.count = 0

    def add(self, line: int) -> None:
        byte, bit = divmod(line, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits) + len(self.bits) // 2))
        if not self.bits[byte] >> bit & 1:
            self.bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, line: int) -> bool:
        byte, bit = divmod(line, 8)
        return byte < len(self.bits) and bool(self.bits[byte] >> bit & 1)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0


class JsonlWriter:
    format = "jsonl"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._synced = 0.0

    def committed(self) -> LineSet:
        """Lines with a complete record; a torn final line is cut off (a truncation only)."""
        done = LineSet()
        if not self.path.exists():
            return done
        end = 0  # offset just past the last complete line
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break
                line = record_line(raw)
                if line is None:
                    raise ValueError(f"{self.path}:{number}: not a record of this job's output "
                                     "(resume needs an output written by vllm-prepack batch)")
                done.add(line)
                end += len(raw)
        if end < self.path.stat().st_size:
            os.truncate(self.path, end)
        return done

    def write(self, payload: bytes) -> None:
        if not payload:
            return
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(payload)
        self._file.flush()
        if time.monotonic() - self._synced >= SYNC_EVERY_S:
            self._sync()

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None


class ParquetWriter:
    """Parts of about `rows_per_part` rows; a part is committed by its rename."""

    format = "parquet"

    def __init__(self, path: Path, rows_per_part: int = 4096):
        import pyarrow  # noqa: F401  (fail early with a clear ImportError)

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rows_per_part = rows_per_part
        self._buffer: list = []
        self._rows = 0
        parts = sorted(self.path.glob("part-*.parquet"))
        self._part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def committed(self) -> LineSet:
        import pyarrow.parquet as pq

        for tmp in self.path.glob(".part-*.tmp"):  # never renamed: never committed
            tmp.unlink()
        done = LineSet()
        for part in sorted(self.path.glob("part-*.parquet")):
            for line in pq.read_table(part, columns=["line"]).column("line").to_pylist():
                done.add(line)
        return done

    def write(self, table) -> None:
        self._buffer.append(table)
        self._rows += table.num_rows
        if self._rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = self.path / f".part-{self._part:06d}.tmp"
        pq.write_table(pa.concat_tables(self._buffer), tmp)
        tmp.rename(self.path / f"part-{self._part:06d}.parquet")
        self._part += 1
        self._buffer, self._rows = [], 0

    def close(self) -> None:
        self.flush()


def open_writer(path: str | Path):
    return ParquetWriter(Path(path)) if Path(path).suffix == ".parquet" else JsonlWriter(Path(path))
