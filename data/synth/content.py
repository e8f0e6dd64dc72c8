"""Fake text for synthetic paperwork: receipt lines, letters, forms, memos and invoices.

Every function takes a `random.Random` and returns plain strings, so the pictures drawn from them
are reproducible for a seed. Names are invented.
"""

from __future__ import annotations

import random

STORES = [
    "FRESH MART", "CORNER DELI", "QUICKSTOP 24", "BLUE LEAF CAFE", "HARDWARE PLUS", "CITY PHARMACY",
    "GREEN GROCER", "PETROL EXPRESS", "THE BOOK NOOK", "TACO LOCO", "SUNRISE BAKERY", "MEGA SAVE",
    "PIZZA PALACE", "OFFICE DEPOT CO", "GARDEN CENTRE", "NOODLE HOUSE", "PET WORLD", "SHOE BOX",
    "VALUE FOODS", "RIVERSIDE DINER", "TECH CORNER", "DAILY NEWS KIOSK", "FARMERS MARKET",
]
ITEMS = [
    "MILK 2L", "BREAD WHOLEMEAL", "BANANAS", "COFFEE LATTE", "ESPRESSO", "SANDWICH", "APPLES 1KG",
    "EGGS FREE RANGE", "CHEESE CHEDDAR", "WATER 500ML", "CHOC BAR", "NEWSPAPER", "SCREWS M4 X20",
    "PAINT BRUSH", "BATTERIES AA", "SHAMPOO", "TOOTHPASTE", "PAPER TOWEL", "RICE 5KG", "OLIVE OIL",
    "TOMATOES", "CHICKEN BREAST", "YOGHURT", "ORANGE JUICE", "PASTA", "CROISSANT", "MUFFIN",
    "UNLEADED 95", "CAR WASH", "NOTEBOOK A5", "PENS BLUE X3", "DOG FOOD", "CAT LITTER", "SOCKS",
    "PHONE CABLE", "TEA BAGS", "SUGAR 1KG", "BUTTER", "ICE CREAM", "SALAD BOWL", "SOUP OF DAY",
]
STREETS = ["High St", "Main Road", "Station Ave", "Market Sq", "Church Lane", "Park Blvd", "Mill Rd",
           "King St", "Harbour Way", "Elm Street"]
TOWNS = ["Springfield", "Riverton", "Lakeside", "Oakdale", "Westbury", "Fairview", "Greenwich",
         "Hillcrest", "Brookfield", "Ashford"]
PAYMENTS = ["VISA ****", "MASTERCARD ****", "DEBIT ****", "AMEX ****", "CASH", "CONTACTLESS ****"]
WORDS = ("the of and to in we your our for this with on is as by be are from that at please have "
         "account payment invoice tax return year income statement period due amount balance notice "
         "regarding enclosed information further contact office reference date received policy "
         "review request documents required following section schedule total return attached "
         "customer service department kindly regards sincerely annual report").split()
FORM_FIELDS = [
    "Wages, salaries, tips", "Taxable interest", "Ordinary dividends", "IRA distributions",
    "Pensions and annuities", "Social security benefits", "Capital gain or (loss)", "Other income",
    "Adjustments to income", "Standard deduction", "Qualified business income", "Taxable income",
    "Total tax", "Federal income tax withheld", "Estimated tax payments", "Refundable credits",
    "Amount overpaid", "Amount you owe", "Filing status", "Dependents", "Spouse's SSN",
]

# Office forms and memos, the typewritten kind archives scan (request, approval and order forms).
FORM_TITLES = [
    "RESEARCH PROJECT REQUEST", "PURCHASE REQUISITION", "ADVERTISING PRODUCTION ORDER", "BUDGET APPROVAL",
    "REQUEST FOR AUTHORIZATION", "MARKETING RESEARCH PROPOSAL", "PRINT ORDER", "CHANGE NOTICE",
    "SPECIAL PROJECT AUTHORIZATION", "TEST PROGRAM SUMMARY", "MEDIA SCHEDULE", "TRAVEL EXPENSE REPORT",
    "CONFIDENTIAL", "SAMPLE SHIPMENT REQUEST", "PRODUCT CHANGE REQUEST", "FAX TRANSMITTAL",
]
FORM_LABELS = [
    "DATE", "TO", "FROM", "PROJECT NO.", "REQUESTED BY", "DEPARTMENT", "BUDGET CODE", "APPROVED BY",
    "BRAND", "QUANTITY", "SUPPLIER", "DELIVERY DATE", "ACCOUNT NO.", "REFERENCE", "DIVISION",
    "COST CENTER", "TELEPHONE", "SUBJECT", "ESTIMATED COST", "START DATE", "COMPLETION DATE", "REGION",
    "CONTACT", "PAGES", "CHARGE TO", "VENDOR", "ORDER NO.", "PREPARED BY", "DISTRIBUTION", "REMARKS",
]
MEMO_TITLES = ["MEMORANDUM", "INTER-OFFICE MEMORANDUM", "INTEROFFICE CORRESPONDENCE", "M E M O R A N D U M"]
SURNAMES = ["Smith", "Jones", "Garcia", "Chen", "Okafor", "Novak", "Silva", "Patel", "Brown", "Keller",
            "Moreau", "Haddad", "Larsen", "Ito", "Walsh", "Romero"]
STAMP_WORDS = ["RECEIVED", "APPROVED", "PAID", "COPY", "FILED", "CONFIDENTIAL", "ENTERED", "URGENT"]


def person(rng: random.Random) -> str:
    return f"{rng.choice('ABCDEFGHJKLMNPRSTW')}. {rng.choice('ABCDEFGHJKLMNPRSTW')}. {rng.choice(SURNAMES)}"


def form_value(rng: random.Random) -> str:
    """What gets typed after a form's label: a date, a code, an amount, a name or a few words."""
    kind = rng.choice(["date", "code", "money", "name", "words"])
    if kind == "date":
        return date_text(rng)
    if kind == "code":
        return f"{rng.randint(10, 999)}-{rng.randint(1000, 99999)}"
    if kind == "money":
        return "$" + money(rng, 50, 250000)
    if kind == "name":
        return person(rng)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))).upper()


def money(rng: random.Random, low: float, high: float) -> str:
    return f"{rng.uniform(low, high):.2f}"


def date_text(rng: random.Random) -> str:
    return f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/20{rng.randint(18, 25)}"


def receipt_lines(rng: random.Random, width_chars: int) -> list[tuple[str, str]]:
    """Lines of a till receipt as (style, text); style is "title", "center", "text" or "bold".

    Text lines are padded to `width_chars` so prices line up on the right as on a real printer.
    """
    rule = ("text", rng.choice("-=*.") * width_chars)
    lines = [("title", rng.choice(STORES)),
             ("center", f"{rng.randint(1, 299)} {rng.choice(STREETS)}, {rng.choice(TOWNS)}"),
             ("center", f"TEL {rng.randint(100, 999)} {rng.randint(1000, 9999)}")]
    if rng.random() < 0.5:
        lines.append(("center", f"VAT NO {rng.randint(100000000, 999999999)}"))
    lines += [("text", f"{date_text(rng)}  {rng.randint(7, 22):02d}:{rng.randint(0, 59):02d}"),
              ("text", f"TILL {rng.randint(1, 12)}  CASHIER {rng.choice(['ANA', 'BOB', 'KIM', 'LEE', '042'])}"),
              rule]
    total = 0.0
    for _ in range(rng.randint(2, 22)):
        price = round(rng.uniform(0.5, 45.0), 2)
        total += price
        lines.append(("text", _left_right(rng.choice(ITEMS), f"{price:.2f}", width_chars)))
        if rng.random() < 0.2:
            lines.append(("text", f"  {rng.randint(2, 6)} x {price / 2:.2f}"))
    return lines + _receipt_footer(rng, width_chars, total, rule)


def _receipt_footer(rng: random.Random, width_chars: int, total: float,
                    rule: tuple[str, str]) -> list[tuple[str, str]]:
    tax = total * rng.choice([0.0, 0.05, 0.08, 0.1, 0.2])
    lines = [rule,
             ("text", _left_right("SUBTOTAL", f"{total:.2f}", width_chars)),
             ("text", _left_right("TAX", f"{tax:.2f}", width_chars)),
             ("bold", _left_right("TOTAL", f"{total + tax:.2f}", width_chars)),
             ("text", rng.choice(PAYMENTS) + str(rng.randint(1000, 9999)))]
    if rng.random() < 0.6:
        lines += [("text", f"AUTH CODE {rng.randint(100000, 999999)}"),
                  ("text", f"TERMINAL {rng.randint(10000000, 99999999)}"), rule]
    if rng.random() < 0.6:
        lines.append(("center", rng.choice(["THANK YOU", "THANK YOU FOR SHOPPING", "PLEASE COME AGAIN",
                                            "KEEP RECEIPT FOR RETURNS"])))
    if rng.random() < 0.4:
        words = sentence(rng, rng.randint(10, 30)).upper()
        lines += [("text", words[i:i + width_chars]) for i in range(0, len(words), width_chars)]
    return lines


def _left_right(left: str, right: str, width: int) -> str:
    room = max(1, width - len(right) - 1)
    return left[:room].ljust(room) + " " + right


def sentence(rng: random.Random, n_words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return text[0].upper() + text[1:] + "."


def letter_paragraphs(rng: random.Random) -> list[str]:
    return [" ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 5)))
            for _ in range(rng.randint(2, 5))]


def address_block(rng: random.Random) -> list[str]:
    return [f"{rng.choice(['Ms', 'Mr', 'Dr'])} {rng.choice('ABCDEFGHJKLMNPRSTW')}. "
            f"{rng.choice(['Smith', 'Jones', 'Garcia', 'Chen', 'Okafor', 'Novak', 'Silva', 'Patel'])}",
            f"{rng.randint(1, 299)} {rng.choice(STREETS)}",
            f"{rng.choice(TOWNS)} {rng.randint(10000, 99999)}"]


def form_fields(rng: random.Random, count: int) -> list[str]:
    return rng.sample(FORM_FIELDS, k=min(count, len(FORM_FIELDS)))


def invoice_rows(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """(description, quantity, amount) rows of an invoice table."""
    services = ["Consulting services", "Software licence", "Maintenance contract", "Office supplies",
                "Delivery charge", "Design work", "Hosting (annual)", "Training session", "Repair labour"]
    return [(rng.choice(services), str(rng.randint(1, 20)), money(rng, 10, 900)) for _ in range(count)]
