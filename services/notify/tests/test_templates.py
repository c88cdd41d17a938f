"""Templates, triggers, locales, channel choice, consent, the cap and
opt-out replies and links: the pure rules, without I/O."""

from __future__ import annotations

import datetime as dt
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.notify.domain import choice, optouts, templates, triggers
from services.notify.domain.messages import LOCALES, Category, Channel
from services.notify.domain.optouts import Scope
from services.notify.domain.templates import DEFAULTS, MessageTemplate, check_template

BODIES = {"zh-CN": "余额 {balance}", "en": "Balance {balance}", "es": "Saldo {balance}"}


def problems(**changes: object) -> dict[str, str]:
    fields: dict[str, object] = {
        "name": "stored_value_debited",
        "trigger": "stored_value_debited",
        "channel": None,
        "bodies": BODIES,
        "subjects": {},
    }
    fields.update(changes)
    return {p.field: p.description for p in check_template(**fields)}  # type: ignore[arg-type]


# --- the catalogue and its defaults ------------------------------------------------


def test_every_trigger_has_a_default_in_every_locale_that_passes_its_own_check() -> None:
    assert set(DEFAULTS) == set(triggers.CATALOGUE)
    for name, template in DEFAULTS.items():
        assert set(template.bodies) == set(LOCALES), name
        assert set(template.subjects) == set(LOCALES), name
        found = check_template(
            name=name,
            trigger=name,
            channel=None,
            bodies=template.bodies,
            subjects=template.subjects,
        )
        assert found == [], (name, found)


def test_chinese_defaults_are_written_in_chinese() -> None:
    for name, template in DEFAULTS.items():
        body = template.bodies["zh-CN"]
        assert sum("\u4e00" <= ch <= "\u9fff" for ch in body) >= 8, name


def test_marketing_defaults_carry_the_way_out_and_service_ones_do_not() -> None:
    for name, template in DEFAULTS.items():
        uses_link = triggers.UNSUBSCRIBE_URL in template.variables()
        marketing = triggers.CATALOGUE[name].category is Category.MARKETING
        assert uses_link == marketing, name


def test_every_default_renders_with_the_samples_in_every_locale() -> None:
    for name, template in DEFAULTS.items():
        trigger = triggers.CATALOGUE[name]
        values = templates.formatted(
            trigger.allowed_variables(), triggers.samples(trigger), "en", "Asia/Shanghai"
        )
        for locale in LOCALES:
            rendered = template.render(locale, values)
            assert "{" not in rendered.body and "}" not in rendered.body, (name, locale)
            assert rendered.subject


def test_staff_triggers_offer_staff_variables_and_no_unsubscribe_link() -> None:
    digest = triggers.CATALOGUE[triggers.WEEKLY_CALL_DIGEST]
    assert {"staff_name", "store_name", "task_count"} <= set(digest.allowed_variables())
    assert triggers.UNSUBSCRIBE_URL not in digest.allowed_variables()
    assert "given_name" not in digest.allowed_variables()
    assert triggers.UNSUBSCRIBE_URL in triggers.CATALOGUE["birthday"].allowed_variables()


# --- checks when saved -------------------------------------------------------------


def test_a_variable_the_trigger_does_not_give_is_refused_naming_it_and_the_locale() -> None:
    found = problems(bodies={**BODIES, "es": "Saldo {balance_after}"})
    assert list(found) == ["template.bodies[es]"]
    assert "{balance_after}" in found["template.bodies[es]"]
    assert "in es" in found["template.bodies[es]"]
    assert "balance" in found["template.bodies[es]"]


def test_the_unsubscribe_link_is_only_for_marketing() -> None:
    found = problems(bodies={**BODIES, "en": "Balance {balance} {unsubscribe_url}"})
    assert "{unsubscribe_url}" in found["template.bodies[en]"]
    assert (
        problems(
            name="spring_sale",
            trigger="marketing",
            bodies={locale: "{given_name} {unsubscribe_url}" for locale in LOCALES},
        )
        == {}
    )


@pytest.mark.parametrize(
    "body",
    ["Balance {balance", "Balance balance}", "{balance!r}", "{balance:>999}", "{0}", "{}", "{a.b}"],
)
def test_malformed_braces_and_format_tricks_are_refused(body: str) -> None:
    found = problems(bodies={**BODIES, "en": body})
    assert "template.bodies[en]" in found


def test_literal_braces_are_allowed() -> None:
    assert problems(bodies={**BODIES, "en": "{{VIP}} balance {balance}"}) == {}


def test_all_three_languages_are_needed_and_no_other() -> None:
    found = problems(bodies={"en": "Balance {balance}", "fr": "Solde {balance}"})
    assert "zh-CN" in found["template.bodies"] and "es" in found["template.bodies"]
    assert "template.bodies[fr]" in found


def test_name_trigger_and_channel_are_checked() -> None:
    assert "template.name" in problems(name="Bad Name!")
    assert "template.trigger" in problems(name="x_custom", trigger="no_such")
    # A trigger's name belongs to that trigger's own wording.
    assert "template.trigger" in problems(name="welcome")
    assert "template.channel" in problems(channel=Channel.POST)
    assert "template.channel" in problems(channel=Channel.DEV_LOG)
    assert problems(channel=Channel.EMAIL) == {}


def test_subjects_are_one_line_and_checked_like_bodies() -> None:
    found = problems(subjects={"en": "Paid\nnow", "es": "{nope}"})
    assert "template.subjects[en]" in found and "template.subjects[es]" in found


@given(st.text(alphabet=string.printable + "余额退订", max_size=60))
def test_the_check_never_crashes_and_whatever_passes_renders(text: str) -> None:
    bodies = {**BODIES, "en": text}
    found = check_template(
        name="stored_value_debited",
        trigger="stored_value_debited",
        channel=None,
        bodies=bodies,
        subjects={},
    )
    if not found:
        template = MessageTemplate("stored_value_debited", "stored_value_debited", bodies)
        values = triggers.samples(triggers.CATALOGUE["stored_value_debited"])
        rendered = template.render("en", values)
        assert isinstance(rendered.body, str)


# --- rendering ---------------------------------------------------------------------


def test_money_numbers_and_times_read_as_the_reader_reads_them() -> None:
    kinds = triggers.CATALOGUE["event_invitation"].allowed_variables()
    values = {"start_time": "2026-12-20T11:00:00+00:00", "rsvp_deadline": "2026-12-18"}
    zh = templates.formatted(kinds, values, "zh-CN", "Asia/Shanghai")
    assert zh["start_time"] == "2026年12月20日 19:00"
    assert zh["rsvp_deadline"] == "2026年12月18日"
    en = templates.formatted(kinds, values, "en", "Europe/Madrid")
    assert en["start_time"] == "20 Dec 2026, 12:00"
    es = templates.formatted(kinds, values, "es", "Europe/Madrid")
    assert es["start_time"] == "20 dic 2026, 12:00"
    assert templates.format_money("CNY:123450", "zh-CN") == "¥1,234.50"
    assert templates.format_money("EUR:123450", "es") == "1.234,50 €"
    assert templates.format_money("JPY:5000", "en") == "¥5,000"
    assert templates.format_value(triggers.Kind.NUMBER, "1200", "es", "") == "1.200"
    # A value that does not parse is shown as it is, never a failed message.
    assert templates.format_value(triggers.Kind.MONEY, "lots", "en", "") == "lots"


def test_rendering_needs_every_variable() -> None:
    with pytest.raises(KeyError):
        DEFAULTS["stored_value_debited"].render("en", {"amount": "¥1"})


# --- the reader's language -----------------------------------------------------------


@pytest.mark.parametrize(
    ("preferred", "store", "chosen"),
    [
        ("en", "zh-CN", "en"),
        ("es-MX", "zh-CN", "es"),
        ("zh-cn", "en", "zh-CN"),
        ("zh-Hans", "en", "zh-CN"),
        ("", "es", "es"),
        ("fr", "en", "en"),
        ("", "", "zh-CN"),
    ],
)
def test_locale_is_the_members_else_the_stores_else_the_chains(
    preferred: str, store: str, chosen: str
) -> None:
    assert templates.choose_locale(preferred, store) == chosen


# --- channels, consent, opt-outs and the cap -------------------------------------------

NOW = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
ORDER = (Channel.SMS, Channel.PUSH, Channel.EMAIL)
PHONE_AND_MAIL = frozenset({Channel.SMS, Channel.EMAIL, Channel.CALL_TASK})


def reach(**changes: object) -> choice.Reach:
    fields: dict[str, object] = {"addresses": PHONE_AND_MAIL}
    fields.update(changes)
    return choice.Reach(**fields)  # type: ignore[arg-type]


def test_transactional_goes_on_the_preferred_channel_when_reachable_there() -> None:
    picked = choice.choose_channel(Category.TRANSACTIONAL, ORDER, reach(preferred=Channel.EMAIL))
    assert picked == choice.Choice(Channel.EMAIL)
    # Preferred push, but no app: the trigger's order.
    picked = choice.choose_channel(Category.TRANSACTIONAL, ORDER, reach(preferred=Channel.PUSH))
    assert picked == choice.Choice(Channel.SMS)


def test_transactional_needs_no_consent_but_obeys_an_opt_out_of_everything() -> None:
    assert choice.choose_channel(Category.TRANSACTIONAL, ORDER, reach()).channel is Channel.SMS
    marketing_only = [choice.OptOut(Channel.SMS, Scope.MARKETING, NOW)]
    assert (
        choice.choose_channel(Category.TRANSACTIONAL, ORDER, reach(optouts=marketing_only)).channel
        is Channel.SMS
    )
    everything = [choice.OptOut(Channel.SMS, Scope.ALL, NOW)]
    assert (
        choice.choose_channel(Category.TRANSACTIONAL, ORDER, reach(optouts=everything)).channel
        is Channel.EMAIL
    )


def test_marketing_goes_only_where_consent_was_granted() -> None:
    assert choice.choose_channel(Category.MARKETING, ORDER, reach()) == choice.Choice(
        None, choice.NO_CONSENT
    )
    consents = {Channel.EMAIL: choice.Consent(True, NOW), Channel.SMS: choice.Consent(False, NOW)}
    assert choice.choose_channel(Category.MARKETING, ORDER, reach(consents=consents)).channel is (
        Channel.EMAIL
    )


def test_a_marketing_opt_out_wins_until_consent_is_granted_again() -> None:
    consents = {Channel.SMS: choice.Consent(True, NOW - dt.timedelta(days=30))}
    out = [choice.OptOut(Channel.SMS, Scope.MARKETING, NOW - dt.timedelta(days=1))]
    picked = choice.choose_channel(Category.MARKETING, ORDER, reach(consents=consents, optouts=out))
    assert picked == choice.Choice(None, choice.OPTED_OUT)
    again = {Channel.SMS: choice.Consent(True, NOW)}
    picked = choice.choose_channel(Category.MARKETING, ORDER, reach(consents=again, optouts=out))
    assert picked.channel is Channel.SMS


def test_no_address_is_told_apart_from_no_consent() -> None:
    consents = {Channel.PUSH: choice.Consent(True, NOW)}
    picked = choice.choose_channel(
        Category.MARKETING, ORDER, reach(addresses=frozenset(), consents=consents)
    )
    assert picked == choice.Choice(None, choice.NO_ADDRESS)


def test_a_channel_the_sender_chose_is_the_only_one_tried() -> None:
    picked = choice.choose_channel(Category.TRANSACTIONAL, ORDER, reach(), only=Channel.PUSH)
    assert picked == choice.Choice(None, choice.NO_ADDRESS)


@given(
    granted=st.dictionaries(st.sampled_from(list(ORDER)), st.booleans()),
    addresses=st.frozensets(st.sampled_from(list(ORDER))),
    opted=st.lists(st.tuples(st.sampled_from(list(ORDER)), st.sampled_from(list(Scope)))),
)
def test_marketing_is_never_sent_without_consent_or_after_an_opt_out(
    granted: dict[Channel, bool],
    addresses: frozenset[Channel],
    opted: list[tuple[Channel, Scope]],
) -> None:
    consents = {c: choice.Consent(g, NOW - dt.timedelta(days=9)) for c, g in granted.items()}
    outs = [choice.OptOut(c, s, NOW) for c, s in opted]
    picked = choice.choose_channel(
        Category.MARKETING, ORDER, choice.Reach(addresses, consents, None, outs)
    )
    if picked.channel is not None:
        assert granted.get(picked.channel) is True
        assert picked.channel in addresses
        assert all(c is not picked.channel for c, _ in opted)
    else:
        assert picked.reason in (choice.NO_CONSENT, choice.OPTED_OUT, choice.NO_ADDRESS)


def test_the_weekly_cap() -> None:
    assert not choice.over_weekly_cap(2, 3)
    assert choice.over_weekly_cap(3, 3)
    assert choice.over_weekly_cap(0, 0)


# --- opt-out replies and links ---------------------------------------------------------

KEYWORDS = frozenset({"STOP", "TD", "退订", "BAJA"})


@pytest.mark.parametrize("reply", ["STOP", " stop ", "Stop.", "ＴＤ", "td", "【退订】", "baja!"])
def test_opt_out_replies(reply: str) -> None:
    assert optouts.is_optout_reply(reply, KEYWORDS)


@pytest.mark.parametrize("reply", ["", "please don't stop", "TDD", "谢谢", "STOPPED"])
def test_other_replies_are_not_opt_outs(reply: str) -> None:
    assert not optouts.is_optout_reply(reply, KEYWORDS)


def test_unsubscribe_links_name_member_and_channel_and_cannot_be_forged() -> None:
    key = b"k" * 32
    token = optouts.sign_link(key, "M7Q2K9X4TD", Channel.SMS)
    assert optouts.verify_link(key, token) == optouts.LinkClaim("M7Q2K9X4TD", Channel.SMS)
    with pytest.raises(optouts.BadLink):
        optouts.verify_link(b"x" * 32, token)
    forged = optouts.sign_link(key, "M0000000000", Channel.SMS).split(".")[0]
    with pytest.raises(optouts.BadLink):
        optouts.verify_link(key, f"{forged}.{token.split('.')[1]}")
    for junk in ("", "abc", "a.b", token + "x", "." + token):
        with pytest.raises(optouts.BadLink):
            optouts.verify_link(key, junk)
    url = optouts.unsubscribe_url("https://shop.example/", token)
    assert url == f"https://shop.example/v1/unsubscribe/{token}"


# --- the policy document ----------------------------------------------------------------


def test_the_policy_document_keeps_every_field_and_fills_new_ones_with_defaults() -> None:
    from services.notify.domain.policy import NotifyPolicy, QuietHours
    from services.notify.store.policy import policy_document, policy_from_document

    policy = NotifyPolicy(
        quiet_hours=QuietHours(dt.time(22, 30), dt.time(8, 0), frozenset({Channel.SMS})),
        marketing_weekly_cap=5,
        store_locales={"S002": "es"},
        optout_keywords=frozenset({"STOP", "退订"}),
    )
    document = policy_document(policy)
    assert policy_from_document(document) == policy
    del document["marketing_weekly_cap"]
    assert (
        policy_from_document(document).marketing_weekly_cap == NotifyPolicy().marketing_weekly_cap
    )
