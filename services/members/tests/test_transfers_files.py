"""Reading import files as streams: CSV with a byte order mark and blank
lines, XLSX with numbers and dates in cells, files that are not what they
claim."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from openpyxl import Workbook

from chassis.crypto import DecryptionError, keys_from_env
from chassis.errors import InvalidArgument
from services.members.domain.members import Birthday, Enrollment, EnrollmentChannel
from services.members.domain.transfers import is_blank, row_to_enrollment
from services.members.server.transfers import BadFile, check_file, open_records
from services.members.store.transfers import FileCipher


def enrollments(path: Path, file_format: str) -> list[tuple[int, Enrollment]]:
    out = []
    with open_records(path, file_format) as (columns, records):
        for record in records:
            if is_blank(record.cells):
                continue
            enrollment = row_to_enrollment(
                record.row,
                record.cells,
                columns,
                default_home_store_id="S001",
                channel=EnrollmentChannel.BATCH_IMPORT,
            )
            assert isinstance(enrollment, Enrollment)
            out.append((record.row, enrollment))
    return out


def test_csv_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeff姓名,手机\n李娜,13800138000\n\n,\n王伟,13900139000\n".encode())
    rows = enrollments(path, "csv")
    assert [(row, e.given_name, e.mobile) for row, e in rows] == [
        (2, "李娜", "13800138000"),
        (5, "王伟", "13900139000"),
    ]


def test_xlsx_numbers_and_dates(tmp_path: Path) -> None:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Name", "Mobile", "Birthday"])
    sheet.append(["Li Na", 13800138000, dt.datetime(1990, 5, 17)])
    sheet.append([None, None, None])
    sheet.append(["Wang Wei", "139 0013 9000", "1985-02-03"])
    path = tmp_path / "m.xlsx"
    book.save(path)
    rows = enrollments(path, "xlsx")
    assert [(row, e.mobile, e.birthday) for row, e in rows] == [
        (2, "13800138000", Birthday(1990, 5, 17)),
        (4, "139 0013 9000", Birthday(1985, 2, 3)),
    ]


def test_files_that_are_not_what_they_claim(tmp_path: Path) -> None:
    fake = tmp_path / "m.xlsx"
    fake.write_bytes(b"name,mobile\n")
    with pytest.raises(BadFile):
        check_file(fake, "xlsx")
    headless = tmp_path / "m.csv"
    headless.write_bytes(b"")
    with pytest.raises(InvalidArgument):
        check_file(headless, "csv")


def test_the_pieces_of_a_file_are_sealed_to_their_job_and_place() -> None:
    ring, _index = keys_from_env("MEMBERS", {}, production=False)
    cipher, wrapped = FileCipher.new(ring, "J0000000001")
    sealed = [cipher.seal(seq, piece) for seq, piece in enumerate([b"name,mobile\n", b"Li,138\n"])]
    assert all(b"mobile" not in s and b"138" not in s for s in sealed)
    # Another replica opens them with the wrapped key kept beside the job.
    again = FileCipher.of(ring, "J0000000001", wrapped)
    assert [again.open(seq, s) for seq, s in enumerate(sealed)] == [b"name,mobile\n", b"Li,138\n"]
    with pytest.raises(DecryptionError):
        again.open(1, sealed[0])  # a piece moved to another place
    with pytest.raises(DecryptionError):
        FileCipher.of(ring, "J0000000002", wrapped)  # another job's key
