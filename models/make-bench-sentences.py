#!/usr/bin/env python3
"""Writes the fixed sentence set of the embedding benchmark (models/bench-sentences.txt).

    python3 models/make-bench-sentences.py [OUT]   (default: models/bench-sentences.txt)

The sentences are generated from small word lists with a fixed seed (standard library only),
so the set is the same on every machine and copies no corpus. Lengths vary on purpose, from a
few words to long multi-clause sentences and a few paragraphs, as real embedding requests do.
"""

import random
import sys

SUBJECTS = [
    "the operator", "a field technician", "the gateway", "our edge node", "the pump controller",
    "a delivery drone", "the weather station", "the night shift", "the maintenance team",
    "a remote sensor", "the warehouse robot", "the billing service", "a solar inverter",
    "the greenhouse", "the water treatment plant", "my neighbour", "the small bakery",
    "a curious child", "the old lighthouse keeper", "the city council", "the research vessel",
    "a freight train", "the hospital pharmacy", "the mountain hut", "a tired cyclist",
]
VERBS = [
    "restarted", "reported", "measured", "ignored", "updated", "replaced", "inspected",
    "scheduled", "forgot", "repaired", "uploaded", "calibrated", "shut down", "photographed",
    "ordered", "cleaned", "delayed", "approved", "rejected", "monitored", "moved", "painted",
]
OBJECTS = [
    "the firmware", "a faulty valve", "the temperature logs", "three broken panels",
    "the backup battery", "an urgent ticket", "the cooling fan", "the nightly report",
    "a shipment of seeds", "the access token", "the north gate", "the coffee machine",
    "the storage tank", "a cracked window", "the model weights", "the vibration sensor",
    "the invoice", "a bag of flour", "the signal lamp", "the ferry timetable",
]
PLACES = [
    "in the basement", "near the river", "at the substation", "on the roof", "behind the depot",
    "in the north wing", "at the harbour", "under the bridge", "in the cold store",
    "at the border crossing", "on the third floor", "in the control room", "at the farm",
]
TIMES = [
    "yesterday", "this morning", "last week", "before dawn", "after the storm", "on Monday",
    "during the audit", "at midnight", "twice a day", "every spring", "an hour ago",
]
REASONS = [
    "because the readings drifted", "after a power cut", "to meet the new safety rules",
    "since nobody else had the key", "while the network was down", "so the harvest could go on",
    "although the forecast was wrong", "before the inspectors arrived",
    "because the customer complained twice", "to save fuel over the winter",
]
QUESTIONS = [
    "Why did {s} {v} {o}?", "Has {s} {v} {o} {t}?", "Who {v} {o} {p}?",
    "When will {s} check {o} again?", "Is {o} still {p}?",
]
SHORT = [
    "Hello.", "Thanks!", "Pump offline.", "All good here.", "Battery low.", "Door open",
    "Check the logs", "Temperature rising fast.", "Restart scheduled.", "No signal.",
    "Where is the spare key?", "Rain expected tonight.", "Update failed", "OK", "see above",
]
ADJ = ["quiet", "noisy", "slow", "careful", "late", "cheerful", "strange", "grey", "new", "busy"]
NOUNS = ["morning", "shift", "season", "week", "inspection", "journey", "market", "meeting"]


def clause(r):
    return "{} {} {} {}".format(r.choice(SUBJECTS), r.choice(VERBS), r.choice(OBJECTS), r.choice(PLACES))


def sentence(r, kind):
    if kind == 0:
        return r.choice(SHORT)
    if kind == 1:
        s = "{} {} {}.".format(r.choice(SUBJECTS), r.choice(VERBS), r.choice(OBJECTS))
        return s[0].upper() + s[1:]
    if kind == 2:
        s = "{} {}, {}.".format(r.choice(TIMES).capitalize(), clause(r), r.choice(REASONS))
        return s
    if kind == 3:
        q = r.choice(QUESTIONS).format(
            s=r.choice(SUBJECTS), v=r.choice(VERBS), o=r.choice(OBJECTS), p=r.choice(PLACES),
            t=r.choice(TIMES))
        return q[0].upper() + q[1:]
    if kind == 4:
        n = r.randint(2, 4)
        parts = [clause(r) for _ in range(n)]
        s = ", and ".join(parts) + " " + r.choice(REASONS) + "."
        return s[0].upper() + s[1:]
    if kind == 5:
        s = "It was a {} {}: {} {}, then {} {}.".format(
            r.choice(ADJ), r.choice(NOUNS), clause(r), r.choice(TIMES), clause(r), r.choice(REASONS))
        return s
    # A paragraph: several full sentences, sometimes past the model's 128 tokens.
    n = r.randint(4, 9)
    return " ".join(sentence(r, r.choice([1, 2, 3, 5])) for _ in range(n))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "models/bench-sentences.txt"
    r = random.Random(20251123)
    # Mostly short and medium sentences, some long ones, a few paragraphs.
    weights = [10, 25, 25, 15, 12, 8, 5]
    lines = []
    seen = set()
    while len(lines) < 400:
        kind = r.choices(range(len(weights)), weights=weights)[0]
        s = sentence(r, kind)
        if kind == 0 or s not in seen:
            seen.add(s)
            lines.append(s)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
