"""Message rules: templates and the member's locale."""

from __future__ import annotations

import pytest

from services.notify.domain import (
    DEFAULT_LOCALE,
    LOCALES,
    WELCOME,
    Template,
    choose_locale,
)

MEMBER_ID = "M7Q2K9X4TD"


@pytest.mark.parametrize(
    ("locale", "opening"),
    [("zh-CN", "欢迎加入会员"), ("en", "Welcome to the club"), ("es", "¡Bienvenido al club")],
)
def test_welcome_renders_in_each_locale_with_the_member_id(locale: str, opening: str) -> None:
    text = WELCOME.render(locale, {"member_id": MEMBER_ID})
    assert text.startswith(opening)
    assert MEMBER_ID in text
    assert "{" not in text
    assert "}" not in text


def test_welcome_has_a_body_for_every_locale_and_the_same_variables() -> None:
    assert set(WELCOME.bodies) == set(LOCALES)
    assert WELCOME.variables() == {"member_id"}
    assert len({WELCOME.render(locale, {"member_id": MEMBER_ID}) for locale in LOCALES}) == 3


def test_a_locale_without_a_body_falls_back_to_the_default() -> None:
    assert WELCOME.render("fr", {"member_id": MEMBER_ID}) == WELCOME.render(
        DEFAULT_LOCALE, {"member_id": MEMBER_ID}
    )


def test_a_missing_variable_raises_rather_than_leaving_a_hole() -> None:
    with pytest.raises(KeyError, match="member_id"):
        WELCOME.render("en", {})
    with pytest.raises(KeyError, match="member_id"):
        WELCOME.render("en", {"points": "100"})


def test_a_variable_missing_in_the_chosen_locale_body_is_still_required() -> None:
    template = Template(
        "points", {"zh-CN": "您有 {points} 积分", "en": "Hi {name}, {points} points"}
    )
    assert template.variables() == {"points", "name"}
    with pytest.raises(KeyError, match="name"):
        template.render("zh-CN", {"points": "10"})
    assert template.render("zh-CN", {"points": "10", "name": "x"}) == "您有 10 积分"


def test_extra_values_are_ignored() -> None:
    assert WELCOME.render("en", {"member_id": MEMBER_ID, "unused": "x"}).count(MEMBER_ID) == 1


def test_template_variables() -> None:
    assert Template("t", {"en": "no variables"}).variables() == set()
    assert Template("t", {"en": "{a} and {b}, {a} again"}).variables() == {"a", "b"}
    assert Template("t", {"en": "{{literal}} and {c:>5}"}).variables() == {"c"}
    assert Template("t", {"en": "{a}", "es": "{b}"}).variables() == {"a", "b"}
    assert Template("t", {"en": "{{not}} {v}"}).render("en", {"v": "1"}) == "{not} 1"


@pytest.mark.parametrize(
    ("preferred", "store_default", "chosen"),
    [
        ("en", "zh-CN", "en"),
        ("es", "en", "es"),
        ("zh-CN", "es", "zh-CN"),
        ("fr", "es", "es"),  # unknown: the store's language
        ("", "en", "en"),
        ("EN", "zh-CN", "zh-CN"),  # locales are exact tags
        ("fr", "de", DEFAULT_LOCALE),  # the store's language unknown too
        ("", "", DEFAULT_LOCALE),
    ],
)
def test_choose_locale(preferred: str, store_default: str, chosen: str) -> None:
    assert choose_locale(preferred, store_default) == chosen


def test_choose_locale_defaults_to_zh_cn() -> None:
    assert DEFAULT_LOCALE == "zh-CN"
    assert choose_locale("fr") == "zh-CN"
    assert choose_locale("en") == "en"
