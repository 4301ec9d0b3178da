"""Login, logout and the landing page that says who you are and what you can see."""

import pytest
from django.conf import settings
from django.shortcuts import resolve_url

from tests.factories import PASSWORD


def test_anonymous_visitor_is_sent_to_login(client):
    response = client.get("/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_login_with_email_and_password_signs_in(client, member):
    response = client.post("/login/", {"username": member.email, "password": PASSWORD})

    assert response.status_code == 302
    assert response["Location"] == resolve_url(settings.LOGIN_REDIRECT_URL)
    assert client.session["_auth_user_id"] == str(member.pk)
    assert client.get("/").status_code == 200


def test_login_with_a_wrong_password_is_refused(client, member):
    response = client.post("/login/", {"username": member.email, "password": "wrong"})

    assert response.status_code == 200
    assert "_auth_user_id" not in client.session


def test_logout_ends_the_session(client, member):
    client.force_login(member)

    response = client.post("/logout/")

    assert response.status_code == 302
    assert client.get("/").status_code == 302


@pytest.mark.parametrize(
    ("persona", "says"),
    [
        ("platform_admin", "platform admin"),
        ("org_admin", "Org admin</strong> in Alpha Corp"),
        ("team_lead", "events of team Platform"),
        ("project_admin", "events of project Chatbot"),
        ("member", "your own events"),
    ],
)
def test_home_says_who_you_are_and_what_you_can_see(client, personas, persona, says):
    user = personas.users[persona]
    client.force_login(user)

    page = client.get("/").content.decode()

    assert user.email in page
    assert says in page


def test_home_of_an_outsider_does_not_mention_the_other_organization(client, outsider):
    client.force_login(outsider)

    page = client.get("/").content.decode()

    assert "Beta Inc" in page
    assert "Alpha" not in page
