#!/usr/bin/env python3
"""Generates the labelled detector corpus, tests/corpus/detectors.jsonl.

Each line: {"text": ..., "labels": [{"detector": ..., "start": ..., "end": ...}]} with
byte offsets (UTF-8) of every identifier that a detector should report. The numbers are
made here, with check digits computed by this script (an implementation independent of
the appliance's): valid ones are labelled, near misses (one digit off, so the check digit
fails) and distractors (dates without birth context, amounts, versions, order numbers)
are in the text but not labelled. Sentences mix English, German, French and Dutch.

Deterministic: `python3 tests/corpus/make_corpus.py` rewrites the same file.
"""
import json
import random
import sys
from pathlib import Path

rng = random.Random(20261122)


def digits(n):
    return [rng.randrange(10) for _ in range(n)]


def s(ds):
    return "".join(map(str, ds))


def luhn_ok(ds):
    total = 0
    for i, d in enumerate(reversed(ds)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card():
    """A 16-digit Visa, Mastercard, Discover or JCB number, or a 15-digit Amex one."""
    start = rng.choice([[4], [5, rng.randrange(1, 6)], [6, 0, 1, 1], [3, 5], [3, 7]])
    length = 15 if start == [3, 7] else 16
    prefix = start + digits(length - 1 - len(start))
    for c in range(10):
        if luhn_ok(prefix + [c]):
            return prefix + [c]


def nhs():
    while True:
        d = digits(9)
        c = 11 - sum(x * (10 - i) for i, x in enumerate(d)) % 11
        if c == 11:
            c = 0
        if c != 10:
            return d + [c]


def nhs_ok(d):
    c = 11 - sum(x * (10 - i) for i, x in enumerate(d[:9])) % 11
    c = 0 if c == 11 else c
    return c != 10 and c == d[9]


def bsn():
    while True:
        d = digits(9)
        if d[0] == 0:
            continue
        if (sum(x * (9 - i) for i, x in enumerate(d[:8])) - d[8]) % 11 == 0:
            return d


def bsn_ok(d):
    return (sum(x * (9 - i) for i, x in enumerate(d[:8])) - d[8]) % 11 == 0


def de_tax_check(d10):
    product = 10
    for x in d10:
        total = (x + product) % 10 or 10
        product = (total * 2) % 11
    c = 11 - product
    return 0 if c == 10 else c


def de_tax():
    while True:
        d = [rng.randrange(1, 10)] + digits(9)
        counts = [d.count(k) for k in set(d)]
        if sorted(c for c in counts if c > 1) in ([2], [3]):
            return d + [de_tax_check(d)]


def iban_check(country, bban):
    rearranged = bban + country + "00"
    num = "".join(str(int(ch, 36)) for ch in rearranged)
    return 98 - int(num) % 97


def iban():
    country, length = rng.choice([("DE", 18), ("NL", None), ("GB", None), ("FR", None)])
    if country == "DE":
        bban = s(digits(18))
    elif country == "NL":
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + s(digits(10))
    elif country == "GB":
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + s(digits(14))
    else:
        bban = s(digits(21)) + s(digits(2))
    return f"{country}{iban_check(country, bban):02d}{bban}"


def iban_ok(text):
    t = text.replace(" ", "")
    num = "".join(str(int(ch, 36)) for ch in t[4:] + t[:4])
    return int(num) % 97 == 1


def ssn():
    while True:
        a, g, n = rng.randrange(1, 900), rng.randrange(1, 100), rng.randrange(1, 10000)
        if a != 666:
            return f"{a:03d}-{g:02d}-{n:04d}"


def nir():
    sex = rng.choice("12")
    yy = f"{rng.randrange(100):02d}"
    mm = f"{rng.randrange(1, 13):02d}"
    dept = rng.choice(["75", "13", "69", "2A", "2B", "59"])
    rest = s(digits(6))
    body = sex + yy + mm + dept + rest
    n = int(body.replace("2A", "19").replace("2B", "18"))
    return body + f"{97 - n % 97:02d}"


def off_by_one(text, ok):
    """The same identifier with one digit changed so that its check fails."""
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c.isdigit()]
    for _ in range(50):
        i = rng.choice(positions)
        old = chars[i]
        chars[i] = str((int(old) + rng.randrange(1, 10)) % 10)
        if not ok("".join(chars)):
            return "".join(chars)
        chars[i] = old
    return None


def group(text, size=4, sep=" "):
    return sep.join(text[i:i + size] for i in range(0, len(text), size))


TEMPLATES = {
    "card": ["Please charge card {x} for the invoice.", "Die Kreditkarte {x} wurde abgelehnt.",
             "Carte bancaire : {x}, merci.", "Betaald met creditcard {x} gisteren."],
    "iban": ["Refund to IBAN {x} please.", "Überweisung auf {x} bis Freitag.",
             "Virement sur le compte {x}.", "Graag overmaken naar {x}."],
    "email": ["Write to {x} for details.", "Bitte an {x} schicken.", "Contact : {x}.", "Mail {x} vandaag."],
    "phone": ["Call {x} after 5pm.", "Rückruf unter {x} erbeten.", "Appelez le {x}.", "Bel {x} morgen."],
    "ip": ["The request came from {x} at noon.", "Zugriff von {x} blockiert."],
    "us_ssn": ["SSN {x} on the W-2.", "Social security number: {x}."],
    "nhs_number": ["NHS number {x} on the referral.", "Patient (NHS {x}) seen today."],
    "bsn": ["BSN {x} staat op het formulier.", "Burgerservicenummer: {x}."],
    "de_tax_id": ["Steuer-ID {x} liegt vor.", "Steueridentifikationsnummer {x}."],
    "fr_nir": ["Numéro de sécurité sociale {x}.", "NIR : {x} (assuré)."],
    "dob": ["Date of birth: {x}.", "Patient, DOB {x}, admitted.", "geboren am {x} in Köln.",
            "née le {x} à Lyon.", "geboren op {x}."],
    "icd10": ["Assessment: {x} confirmed.", "Diagnose {x}, Kontrolle in 3 Monaten."],
}

DISTRACTORS = [
    "The meeting is on 2026-11-22 at 14:30 in room B12.",
    "Revenue rose 4.2% to 1,250,000 in Q3; see release v2.3.1.",
    "Order 4111111111 shipped; tracking 1Z999AA10123456784.",
    "Der Termin am 03.12.2026 wurde verschoben.",
    "Version 10.2.0.1 fixes 12 bugs; build 20261122.",
    "Le colis 75013 arrive le 12/12/2026.",
    "Flight A380 departs from gate 22; seat 14C.",
    "Kamer 312, telefoonnummer volgt.",
    "Invoice total: 1 234,56 EUR, due 2026-12-01.",
    "Ref. 12345678, batch 987654321, lot 2026-07.",
]


def make_positive(detector):
    if detector == "card":
        raw = s(card())
        x = rng.choice([raw, group(raw), group(raw, sep="-")]) if len(raw) == 16 else raw
        return x, lambda t: luhn_ok([int(c) for c in t if c.isdigit()])
    if detector == "iban":
        raw = iban()
        return rng.choice([raw, group(raw)]), iban_ok
    if detector == "email":
        user = rng.choice(["jane.doe", "j.smith+billing", "dr_mueller", "info"])
        dom = rng.choice(["example.org", "klinik-nord.de", "hopital.example.fr", "zorg.nl"])
        return f"{user}@{dom}", None
    if detector == "phone":
        return rng.choice(["+44 20 7946 0958", "+1-202-555-0143", "+31 6 12345678", "020 7946 0958",
                           "06-12345678", "+49 30 1234567", "(202) 555-0143", "+33 1 42 68 53 00"]), None
    if detector == "ip":
        return rng.choice(["192.168.10.254", "10.0.0.1", "172.16.4.20", "2001:db8::8a2e:370:7334"]), None
    if detector == "us_ssn":
        return ssn(), None
    if detector == "nhs_number":
        raw = s(nhs())
        return f"{raw[:3]} {raw[3:6]} {raw[6:]}", lambda t: nhs_ok([int(c) for c in t if c.isdigit()])
    if detector == "bsn":
        return s(bsn()), lambda t: bsn_ok([int(c) for c in t if c.isdigit()])
    if detector == "de_tax_id":
        return s(de_tax()), lambda t: de_tax_check([int(c) for c in t[:10]]) == int(t[10])
    if detector == "fr_nir":
        return nir(), lambda t: 97 - int(t[:13].replace("2A", "19").replace("2B", "18")) % 97 == int(t[13:])
    if detector == "dob":
        y, m, d = rng.randrange(1930, 2020), rng.randrange(1, 13), rng.randrange(1, 29)
        months = ["January", "February", "March", "April", "May", "June", "July", "August",
                  "September", "October", "November", "December"]
        return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{d:02d}.{m:02d}.{y}",
                           f"{d} {months[m - 1]} {y}"]), None
    if detector == "icd10":
        return rng.choice(["E11.9", "I25.10", "J45.909", "C50.911", "F32.1", "M54.5", "S72.001A"]), None
    raise ValueError(detector)


def main():
    out = []
    for detector, templates in TEMPLATES.items():
        for i in range(60):
            x, ok = make_positive(detector)
            text = rng.choice(templates).replace("{x}", x)
            prefix = text[: text.index(x)]
            start = len(prefix.encode())
            out.append({"text": text, "labels": [{"detector": detector, "start": start,
                                                  "end": start + len(x.encode())}]})
            if ok is not None and i % 2 == 0:
                miss = off_by_one(x, ok)
                if miss:
                    out.append({"text": rng.choice(templates).replace("{x}", miss), "labels": [],
                                "near_miss": detector})
    for t in DISTRACTORS:
        out.append({"text": t, "labels": []})
    rng.shuffle(out)
    path = Path(__file__).with_name("detectors.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for item in out:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{len(out)} texts -> {path}", file=sys.stderr)


main()
