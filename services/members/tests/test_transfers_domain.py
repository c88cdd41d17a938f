"""Import and export rules: header names to member fields, rows to
enrollments, the cells of an export."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest

from chassis.errors import InvalidArgument
from services.members.domain.members import (
    Birthday,
    Enrollment,
    EnrollmentChannel,
    Gender,
    validate_enrollment,
)
from services.members.domain.transfers import (
    RowProblem,
    birthday_text,
    cell_text,
    is_blank,
    map_header,
    new_import_job_id,
    parse_birthday,
    row_to_enrollment,
    safe_cell,
    violations_to_problems,
)

TODAY = dt.date(2026, 11, 23)


def convert(header: list[str], row: list[object]) -> Enrollment | list[RowProblem]:
    return row_to_enrollment(
        2,
        row,
        map_header(header),
        default_home_store_id="S001",
        channel=EnrollmentChannel.BATCH_IMPORT,
    )


def test_english_headers_in_any_case_and_spacing() -> None:
    columns = map_header(["Given Name", "family_name", "MOBILE", "E-mail", "Date of Birth"])
    assert columns.columns == {
        "given_name": 0,
        "family_name": 1,
        "mobile": 2,
        "email": 3,
        "birthday": 4,
    }
    assert columns.ignored == ()


def test_chinese_headers() -> None:
    columns = map_header(["姓名", "手机号", "性别", "生日", "门店", "邮箱"])
    assert columns.columns == {
        "name": 0,
        "mobile": 1,
        "gender": 2,
        "birthday": 3,
        "home_store_id": 4,
        "email": 5,
    }
    assert map_header(["姓名", "手机"]).columns == {"name": 0, "mobile": 1}
    # Full-width punctuation and spaces fold like their ASCII forms.
    assert map_header(["姓名", " 手机号码（）"]).columns["mobile"] == 1


def test_unknown_columns_are_ignored_and_reported() -> None:
    columns = map_header(["姓名", "手机", "积分", "", "VIP level"])
    assert columns.ignored == ("积分", "VIP level")


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (["姓名", "email"], "no mobile column"),
        (["mobile", "email"], "no name column"),
        (["姓名", "手机", "mobile"], "two columns mean mobile"),
        (["姓名", "given name", "mobile"], "either a full name column"),
        ([], "no mobile column"),
    ],
)
def test_unusable_headers_are_refused(header: list[str], needle: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        map_header(header)
    assert caught.value.reason == "BAD_IMPORT_FILE"
    assert any(needle in v.description for v in caught.value.violations)


def test_row_with_chinese_values_becomes_an_enrollment() -> None:
    enrollment = convert(
        ["姓名", "手机号", "性别", "生日"], ["李娜", "138 0013 8000", "女", "1990年5月17日"]
    )
    assert enrollment == Enrollment(
        home_store_id="S001",
        given_name="李娜",
        mobile="138 0013 8000",
        gender=Gender.FEMALE,
        birthday=Birthday(1990, 5, 17),
        enrollment_channel=EnrollmentChannel.BATCH_IMPORT,
    )


def test_row_store_column_wins_over_the_default_and_short_rows_are_padded() -> None:
    enrollment = convert(["name", "mobile", "store", "email"], ["Ana", "+34612345678", "S002"])
    assert isinstance(enrollment, Enrollment)
    assert enrollment.home_store_id == "S002"
    assert enrollment.email == ""
    blank_store = convert(["name", "mobile", "store"], ["Ana", "+34612345678", "  "])
    assert isinstance(blank_store, Enrollment)
    assert blank_store.home_store_id == "S001"


def test_unreadable_cells_are_reported_by_field_without_their_values() -> None:
    problems = convert(["name", "mobile", "gender", "birthday"], ["Ana", "1", "robot", "soon"])
    assert problems == [
        RowProblem(2, "gender", "female, male or other (女, 男, 其他)"),
        RowProblem(2, "birthday", "a date such as 1990-05-17"),
    ]
    assert all("robot" not in p.reason and "soon" not in p.reason for p in problems)


def test_validation_problems_become_row_problems() -> None:
    enrollment = convert(["name", "mobile", "email"], ["", "12345", "not-an-email"])
    assert isinstance(enrollment, Enrollment)
    with pytest.raises(InvalidArgument) as caught:
        validate_enrollment(
            enrollment,
            today=TODAY,
            default_region="CN",
            default_channel=EnrollmentChannel.BATCH_IMPORT,
        )
    problems = violations_to_problems(7, caught.value.violations)
    assert {p.field for p in problems} == {"given_name", "mobile", "email"}
    assert all(p.row == 7 for p in problems)
    assert all("12345" not in p.reason and "not-an-email" not in p.reason for p in problems)


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("1990-05-17", Birthday(1990, 5, 17)),
        ("1990/5/7", Birthday(1990, 5, 7)),
        ("1990.05.17", Birthday(1990, 5, 17)),
        ("19900517", Birthday(1990, 5, 17)),
        ("1990年5月17日", Birthday(1990, 5, 17)),
        ("5月17日", Birthday(0, 5, 17)),
        ("05-17", Birthday(0, 5, 17)),
        (dt.date(1985, 2, 28), Birthday(1985, 2, 28)),
        (dt.datetime(1985, 2, 28, 0, 0), Birthday(1985, 2, 28)),
        ("May 17", None),
        ("", None),
    ],
)
def test_birthdays(cell: object, expected: Birthday | None) -> None:
    assert parse_birthday(cell) == expected


def test_spreadsheet_cells_as_text() -> None:
    # Excel keeps a mobile typed without a leading quote as a number.
    assert cell_text(13800138000.0) == "13800138000"
    assert cell_text(13800138000) == "13800138000"
    assert cell_text(1.5) == "1.5"
    assert cell_text(None) == ""
    assert cell_text("  Li  ") == "Li"
    assert cell_text(dt.date(2001, 1, 2)) == "2001-01-02"
    assert is_blank(["", None, "  "])
    assert not is_blank(["", "x"])


def test_csv_with_bom_and_blank_lines_reads_like_any_other() -> None:
    raw = "\ufeff姓名,手机号\r\n李娜,13800138000\r\n\r\n,,\r\n王伟,13900139000\r\n".encode()
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    columns = map_header(next(reader))
    rows = [row for row in reader if not is_blank(row)]
    assert columns.columns == {"name": 0, "mobile": 1}
    assert [r[0] for r in rows] == ["李娜", "王伟"]


def test_export_cells() -> None:
    assert birthday_text(Birthday(1990, 5, 7)) == "1990-05-07"
    assert birthday_text(Birthday(0, 5, 7)) == "--05-07"
    assert birthday_text(None) == ""
    assert safe_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert safe_cell("-2") == "'-2"
    assert safe_cell("+8613800138000") == "+8613800138000"
    assert safe_cell("Li") == "Li"


def test_job_ids() -> None:
    first, second = new_import_job_id(), new_import_job_id()
    assert first != second
    assert first.startswith("J")
    assert len(first) == 12
