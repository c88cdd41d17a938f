"""Postal mail: "sending" puts the message on the postal mailing list; a
print shop gets the list as a CSV or XLSX file (``ExportMailingList``),
with the members' addresses read from the members service when the file is
written. A member without a postal address on file fails at once: there is
nothing to print the letter for."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from chassis.db import Database, utcnow
from chassis.spreadsheets import Column, write_xlsx
from services.notify.channels import ChannelError, Needs, PermanentChannelError, Sent
from services.notify.contacts import ContactsUnavailable, Directory, PostalAddress
from services.notify.store import MessageRecord, postal

PROVIDER = "post"

COLUMNS = (
    Column("Message ID", 38),
    Column("Member ID", 14),
    Column("Name", 20),
    Column("Province", 12),
    Column("City", 12),
    Column("District", 12),
    Column("Street", 40),
    Column("Postcode", 10),
    Column("Template", 18),
    Column("Locale", 8),
    Column("Subject", 30),
    Column("Letter", 80),
)


class PostChannel:
    needs = Needs.NOTHING

    def __init__(self, db: Database, contacts: Directory) -> None:
        self.db = db
        self.contacts = contacts

    async def send(self, message: MessageRecord, address: str = "") -> Sent:
        if message.member_id is None:
            raise PermanentChannelError("postal mail goes to members only")
        try:
            contact = await self.contacts.contact(message.member_id)
        except ContactsUnavailable as exc:
            raise ChannelError(str(exc)) from None
        if contact is None:
            raise PermanentChannelError("the member is not on file any more")
        if contact.address is None:
            raise PermanentChannelError("no postal address on file")
        async with self.db.transaction() as session:
            await postal.add_letter(
                session,
                message_id=message.message_id,
                member_id=message.member_id,
                template=message.template,
                locale=message.locale,
                now=utcnow(),
            )
        return Sent(PROVIDER, message.message_id)


def row(letter: postal.Letter, address: PostalAddress) -> list[str]:
    return [
        letter.message_id,
        letter.member_id,
        address.name,
        address.province,
        address.city,
        address.district,
        address.street,
        address.postcode,
        letter.template,
        letter.locale,
        letter.subject,
        letter.body,
    ]


def write_csv(rows: Sequence[Sequence[str]]) -> bytes:
    """UTF-8 with a byte-order mark, which spreadsheet programs need to
    read Chinese correctly; cells that a spreadsheet would run as a formula
    are quoted as text."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([c.header for c in COLUMNS])
    for cells in rows:
        writer.writerow(["'" + c if c[:1] in ("=", "+", "-", "@") else c for c in cells])
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def write_workbook(rows: Sequence[Sequence[str]]) -> bytes:
    return write_xlsx("Mailing list", COLUMNS, rows)
