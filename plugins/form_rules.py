"""Airflow plugin: the trigger forms' text rules, checked by the API server in words.

Each text field of both forms carries its rule as a JSON-schema ``format`` named by the rule in
words with an example (``ml.params.TextRule``). JSON schema only checks formats it knows, so this
plugin, loaded by every Airflow process that reads the plugins folder, registers each rule with
``jsonschema``'s format checker: a bad value is refused before the run is made, and the answer
reads "'x' is not a '<the rule in words>'" (a regular expression would read as noise). The
workers check the same rules again (``ml.settings``, ``ml.containment``).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from jsonschema import FormatChecker

from ml.containment import FORGET_IMAGE_RULE, FORGET_REASON_RULE, MODEL_URI_RULE, OUTPUT_RULE
from ml.params import TextRule, text_rules

RULES: tuple[TextRule, ...] = (
    *text_rules(),
    MODEL_URI_RULE,
    OUTPUT_RULE,
    FORGET_IMAGE_RULE,
    FORGET_REASON_RULE,
)


def register(rules: tuple[TextRule, ...] = RULES) -> None:
    """Make every ``FormatChecker()`` made from now on check these formats."""
    for rule in rules:
        FormatChecker.checkers[rule.expects] = (rule.matches, ())


register()


class FormRulesPlugin(AirflowPlugin):
    name = "image_sentiment_form_rules"
