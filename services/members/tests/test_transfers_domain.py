"""Import and export rules: header names to member fields, rows to
enrollments, the cells of an export."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import replace

import pytest

from chassis.crypto import FieldCipher, WrappedKey, keys_from_env
from chassis.errors import InvalidArgument
from cornucopia.members.v1.events_pb2 import MemberEnrolled
from services.members import importing
from services.members.domain.members import (
    Birthday,
    Enrollment,
    EnrollmentChannel,
    Gender,
    plain,
    validate_enrollment,
)
from services.members.domain.transfers import (
    RowProblem,
    birthday_text,
    cell_text,
    home_store_problem,
    is_blank,
    map_header,
    new_import_job_id,
    parse_birthday,
    row_to_enrollment,
    safe_cell,
    violations_to_problems,
)
from services.members.store.members import Keys, prepare_member

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


def test_a_row_needs_an_open_home_store_of_the_tree() -> None:
    assert home_store_problem(7, exists=True, closed=False) is None
    assert home_store_problem(7, exists=False, closed=False) == RowProblem(
        7, "home_store_id", "no such store"
    )
    assert home_store_problem(7, exists=True, closed=True) == RowProblem(
        7, "home_store_id", "this store is closed and takes no members"
    )


def test_an_imported_member_is_sealed_as_create_member_seals_one() -> None:
    """The rows an import prepares ahead of its bulk insert are those
    insert_member writes: each member under a data key of its own, the
    mobile and e-mail found by blind index, the first history entry the
    whole enrollment."""
    ring, index = keys_from_env("MEMBERS", {}, production=False)
    keys = Keys(ring, index)
    asked = convert(
        ["姓名", "手机号", "邮箱", "性别", "生日"],
        ["李娜", "138 0013 8000", "Li.Na@Example.com", "女", "1990-05-17"],
    )
    assert isinstance(asked, Enrollment)
    member = validate_enrollment(
        asked, today=TODAY, default_region="CN", default_channel=EnrollmentChannel.BATCH_IMPORT
    )
    now = dt.datetime(2026, 11, 23, 8, 30, tzinfo=dt.UTC)
    prepared = prepare_member(keys, "M0000000001", member, principal="hq-1", from_store="", now=now)
    other = prepare_member(keys, "M0000000002", member, principal="hq-1", from_store="", now=now)

    row, key_row = prepared.member_row, prepared.key_row
    assert key_row["member_id"] == "M0000000001"
    data_key = ring.unwrap(
        WrappedKey(key_row["master_key_id"], key_row["wrapped_key"]), "M0000000001"
    )
    cipher = FieldCipher(data_key, "M0000000001")
    assert cipher.decrypt("given_name", row["given_name_enc"]) == "李娜"
    assert cipher.decrypt("mobile", row["mobile_enc"]) == "+8613800138000"
    assert row["mobile_index"] == keys.mobile_index("+8613800138000") == prepared.mobile_index
    assert row["email_index"] == keys.email_index(member.email)
    assert (row["birth_month"], row["birth_year"], row["gender"]) == (5, 1990, "female")
    assert (row["enrolled_at"], row["created_at"], row["version"]) == (now, now, 1)
    # Every member has a key of their own: the same values seal differently.
    assert other.key_row["wrapped_key"] != key_row["wrapped_key"]
    assert other.member_row["mobile_enc"] != row["mobile_enc"]
    assert other.member_row["mobile_index"] == row["mobile_index"]

    change = prepared.change_row
    assert (change["operation"], change["fields"], change["principal"]) == (
        "create",
        ["member"],
        "hq-1",
    )
    history = json.loads(cipher.decrypt("history", change["values_enc"]))
    assert history == {"old": {}, "new": {"member": plain(replace(member, enrolled_at=now))}}
    record = prepared.record()
    assert record.member_id == "M0000000001"
    assert record.file == replace(member, enrolled_at=now)
    assert (record.enrolled_by, record.created_at, record.version) == ("hq-1", now, 1)
    assert prepared.tag_rows == [] and prepared.consent_rows == []


def test_a_batch_is_checked_and_sealed_as_single_enrollments_are() -> None:
    """importing.check_rows and importing.prepare, the pure part of an
    import batch: rows refused with their reasons, blank ones skipped, the
    rest validated; each new member sealed with the event CreateMember
    writes for them."""
    ring, index = keys_from_env("MEMBERS", {}, production=False)
    keys = Keys(ring, index)
    how = importing.RowRules(
        columns=map_header(["姓名", "手机号", "生日", "门店"]),
        default_home_store_id="S001",
        channel=EnrollmentChannel.BATCH_IMPORT,
        default_region="CN",
    )
    rows = importing.check_rows(
        keys,
        how,
        TODAY,
        [
            (2, ["李娜", "13800138000", "1990-05-17", ""]),
            (3, ["", "", "", ""]),
            (4, ["Bad", "12345", "someday", "S002"]),
            (5, ["Wang", "13900139000", "", "S002"]),
        ],
    )
    assert [(r.row, r.member is not None) for r in rows] == [(2, True), (4, False), (5, True)]
    assert rows[1].problems == (RowProblem(4, "birthday", "a date such as 1990-05-17"),)
    first = rows[0].member
    assert first is not None and first.home_store_id == "S001"
    assert rows[0].mobile_index == keys.mobile_index("+8613800138000")

    now = dt.datetime(2026, 11, 23, 8, 30, tzinfo=dt.UTC)
    author = importing.Author("hq-1", "", {EnrollmentChannel.BATCH_IMPORT: 7})
    members = [r.member for r in rows if r.member is not None]
    prepared = importing.prepare(keys, author, now, members)
    assert [p.member.member.mobile for p in prepared] == ["+8613800138000", "+8613900139000"]
    assert len({p.member.member_id for p in prepared}) == 2
    for p in prepared:
        assert p.event["subject"] == "members.v1.member.enrolled"
        event = MemberEnrolled.FromString(p.event["payload"])
        assert (event.member_id, event.home_store_id, event.enrollment_channel) == (
            p.member.member_id,
            p.member.member.home_store_id,
            7,
        )
        assert event.enroll_time.ToDatetime(dt.UTC) == now
