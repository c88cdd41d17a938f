"""Member files in and out of spreadsheets. Pure: header names to member
fields, one row's cells to an ``Enrollment``, the rows of an export. The
rules of a member file itself stay in ``domain.members.validate_enrollment``,
which every imported row goes through like any other enrollment."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chassis import spreadsheets
from chassis.errors import FieldViolation, InvalidArgument
from chassis.ids import random_id
from chassis.spreadsheets import normalise_header
from services.members.domain.members import Birthday, Enrollment, EnrollmentChannel, Gender

# Member fields an import fills, and the header names (English and Chinese,
# compared after normalising case, spaces and punctuation) that mean them.
HEADER_ALIASES: Mapping[str, tuple[str, ...]] = {
    "name": ("name", "full name", "member name", "姓名", "会员姓名", "名字", "客户姓名"),
    "given_name": ("given name", "first name", "forename", "名"),
    "family_name": ("family name", "last name", "surname", "姓"),
    "mobile": (
        "mobile",
        "mobile phone",
        "mobile number",
        "cell",
        "cell phone",
        "phone",
        "手机",
        "手机号",
        "手机号码",
        "移动电话",
    ),
    "email": ("email", "e mail", "email address", "邮箱", "电子邮箱", "电子邮件", "邮件"),
    "gender": ("gender", "sex", "性别"),
    "birthday": ("birthday", "birth date", "date of birth", "dob", "生日", "出生日期"),
    "home_store_id": (
        "home store",
        "home store id",
        "store",
        "store id",
        "门店",
        "门店编号",
        "所属门店",
        "开卡门店",
    ),
    "preferred_language": ("language", "preferred language", "语言"),
}

_GENDERS: Mapping[str, Gender] = {
    "": Gender.UNSPECIFIED,
    "f": Gender.FEMALE,
    "female": Gender.FEMALE,
    "woman": Gender.FEMALE,
    "女": Gender.FEMALE,
    "m": Gender.MALE,
    "male": Gender.MALE,
    "man": Gender.MALE,
    "男": Gender.MALE,
    "other": Gender.OTHER,
    "其他": Gender.OTHER,
    "unknown": Gender.UNSPECIFIED,
    "未知": Gender.UNSPECIFIED,
}

_DATE = re.compile(r"^(\d{4})\s*[-/.年]\s*(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*日?$")
_MONTH_DAY = re.compile(r"^(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*日?$")
_COMPACT_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")

# Cells as text, as every service reads spreadsheets.
cell_text = spreadsheets.cell_text
is_blank = spreadsheets.is_blank


_BY_HEADER: Mapping[str, str] = {
    normalise_header(alias): name for name, aliases in HEADER_ALIASES.items() for alias in aliases
}


@dataclass(frozen=True)
class ColumnMap:
    """Which column holds which member field, and which columns were not
    understood (ignored, and reported back to the caller)."""

    columns: Mapping[str, int]
    ignored: tuple[str, ...]


def map_header(header: Sequence[object]) -> ColumnMap:
    """Map a header row to member fields. InvalidArgument when a needed
    column is missing or a field is named twice."""
    columns: dict[str, int] = {}
    ignored: list[str] = []
    problems: list[FieldViolation] = []
    for index, cell in enumerate(header):
        text = cell_text(cell)
        if not text:
            continue
        name = _BY_HEADER.get(normalise_header(text))
        if name is None:
            ignored.append(text)
        elif name in columns:
            problems.append(FieldViolation("file", f"two columns mean {name}: remove one"))
        else:
            columns[name] = index
    if "mobile" not in columns:
        problems.append(
            FieldViolation("file", "no mobile column (e.g. 'mobile', '手机', '手机号')")
        )
    if "given_name" not in columns and "name" not in columns:
        problems.append(
            FieldViolation("file", "no name column (e.g. 'name', 'given name', '姓名')")
        )
    if "name" in columns and ("given_name" in columns or "family_name" in columns):
        problems.append(
            FieldViolation("file", "either a full name column or given/family name columns")
        )
    if problems:
        raise InvalidArgument(
            problems, message="the file's header row cannot be read", reason="BAD_IMPORT_FILE"
        )
    return ColumnMap(columns=columns, ignored=tuple(ignored))


def parse_birthday(value: object) -> Birthday | None:
    """A birthday from a cell: a date, 'YYYY-MM-DD' (also with / . or
    年月日), 'YYYYMMDD', or 'MM-DD' without a year. None when unreadable;
    whether the day is real is validate_enrollment's business."""
    if isinstance(value, dt.datetime):
        return Birthday(value.year, value.month, value.day)
    if isinstance(value, dt.date):
        return Birthday(value.year, value.month, value.day)
    text = cell_text(value)
    for pattern in (_DATE, _COMPACT_DATE):
        match = pattern.match(text)
        if match:
            year, month, day = (int(part) for part in match.groups())
            return Birthday(year, month, day)
    match = _MONTH_DAY.match(text)
    if match:
        month, day = (int(part) for part in match.groups())
        return Birthday(0, month, day)
    return None


@dataclass(frozen=True)
class RowProblem:
    """One reason a row was refused. ``field`` is the member field, never
    the cell's value: reports must not carry personal data."""

    row: int
    field: str
    reason: str


def row_to_enrollment(
    row_number: int,
    cells: Sequence[object],
    columns: ColumnMap,
    *,
    default_home_store_id: str,
    channel: EnrollmentChannel,
) -> Enrollment | list[RowProblem]:
    """The enrollment a row asks for, or the problems that make it
    unreadable. Field rules (phone, e-mail, dates, lengths) are checked
    afterwards by validate_enrollment."""

    def get(name: str) -> object:
        index = columns.columns.get(name)
        if index is None or index >= len(cells):
            return None
        return cells[index]

    problems: list[RowProblem] = []
    gender_text = cell_text(get("gender")).lower()
    gender = _GENDERS.get(gender_text)
    if gender is None:
        problems.append(RowProblem(row_number, "gender", "female, male or other (女, 男, 其他)"))
    birthday = None
    raw_birthday = get("birthday")
    if cell_text(raw_birthday):
        birthday = parse_birthday(raw_birthday)
        if birthday is None:
            problems.append(RowProblem(row_number, "birthday", "a date such as 1990-05-17"))
    if problems:
        return problems
    if "name" in columns.columns:
        # A single name column: kept whole. Splitting Chinese names into
        # family and given names guesses wrong on compound surnames.
        given, family = cell_text(get("name")), ""
    else:
        given, family = cell_text(get("given_name")), cell_text(get("family_name"))
    return Enrollment(
        home_store_id=cell_text(get("home_store_id")) or default_home_store_id,
        given_name=given,
        family_name=family,
        mobile=cell_text(get("mobile")),
        email=cell_text(get("email")),
        gender=gender or Gender.UNSPECIFIED,
        birthday=birthday,
        enrollment_channel=channel,
        preferred_language=cell_text(get("preferred_language")),
    )


def violations_to_problems(
    row_number: int, violations: Sequence[FieldViolation]
) -> list[RowProblem]:
    """validate_enrollment's violations ("member.mobile") as row problems
    ("mobile")."""
    return [
        RowProblem(row_number, v.field.removeprefix("member."), v.description) for v in violations
    ]


NO_SUCH_STORE = "no such store"
STORE_CLOSED = "this store is closed and takes no members"


def home_store_problem(row_number: int, *, exists: bool, closed: bool) -> RowProblem | None:
    """Why a row's home store cannot take the member, as CreateMember says
    it: the store must be one of the organisation tree, and open."""
    if not exists:
        return RowProblem(row_number, "home_store_id", NO_SUCH_STORE)
    if closed:
        return RowProblem(row_number, "home_store_id", STORE_CLOSED)
    return None


def new_import_job_id() -> str:
    return random_id("J", 11)


# -- export --------------------------------------------------------------------

EXPORT_COLUMNS: tuple[str, ...] = (
    "member_id",
    "home_store_id",
    "given_name",
    "family_name",
    "mobile",
    "email",
    "gender",
    "birthday",
    "enrollment_channel",
    "preferred_language",
    "enrolled_at",
)


def birthday_text(birthday: Birthday | None) -> str:
    if birthday is None:
        return ""
    if not birthday.year:
        return f"--{birthday.month:02d}-{birthday.day:02d}"
    return f"{birthday.year:04d}-{birthday.month:02d}-{birthday.day:02d}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """Defuse spreadsheet formula injection: a value that a spreadsheet
    would run as a formula gets a leading apostrophe. Phone numbers in
    E.164 start with '+' and digits only, and are left alone."""
    if text.startswith(_FORMULA_START) and not re.fullmatch(r"\+\d+", text):
        return "'" + text
    return text
