"""Deterministic, generated (not real) data for the financial-zone showcase.

One seed gives one city: a company registry, the tax bureau's and the social-insurance
bureau's records about those companies, three districts' enterprise statistics, and a bank's
loan applicants with the shortlist it wants scored and the consent forms it holds. The
showcase checks every released number against the plaintext answers computed here.
"""

from __future__ import annotations

import csv
import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DISTRICTS = ("huangpu", "jingan", "xuhui")
INDUSTRIES = ("manufacturing", "retail", "software", "finance", "catering", "logistics")
#: a cell no district has: its total is zero
SUM_CELLS = (*INDUSTRIES, "mining")

N_COMPANIES = 3000
N_TAX = 2400  # companies with a 2025 tax filing (the rest are too new)
N_APPLICANTS = 400
N_REGISTERED_APPLICANTS = 340  # the other 60 ids are not in the registry
SHORTLIST = 30  # applicants the bank wants scored
CONSENTED = 24  # of the shortlist, those who signed a consent form

#: clamping bounds the zones declare in their analysis rules (integers, as strings)
TAX_BOUNDS = {"tax_paid_2025": (0, 2_000_000), "employees": (0, 5_000), "arrears_days": (0, 365)}
DISTRICT_BOUNDS = {"employees": (0, 2_000), "revenue_10k": (0, 50_000)}
DISTRICT_K = 5


@dataclass(frozen=True)
class City:
    registry: list[dict[str, Any]]
    tax: list[dict[str, Any]]
    social: list[dict[str, Any]]
    districts: dict[str, list[dict[str, Any]]]
    #: the bank's applicant list: (application number, company id as typed)
    applicants: list[tuple[str, str]]
    #: the bank's scoring shortlist, in request order; the first CONSENTED signed a form
    shortlist: list[str]
    consented: list[str]


def _company_id(rng: random.Random, prefix: str = "9131") -> str:
    return f"{prefix}{rng.randrange(10**13):013d}X"


def generate(seed: int = 2026) -> City:
    rng = random.Random(seed)
    registry = []
    for i in range(N_COMPANIES):
        registry.append(
            {
                "company_id": _company_id(rng),
                "name": f"Company {i:04d} Ltd",
                "district": rng.choice(DISTRICTS),
                "industry": rng.choice(INDUSTRIES),
                "founded_year": rng.randrange(1995, 2025),
                "registered_capital": rng.randrange(10, 5000) * 10_000,
            }
        )
    filers = rng.sample(registry, N_TAX)
    tax = [
        {
            "company_id": c["company_id"],
            "district": c["district"],
            "tax_paid_2025": int(rng.lognormvariate(12, 1.1)),  # a few exceed the bound
            "employees": rng.randrange(3, 3000),
            "arrears_days": 0 if rng.random() < 0.7 else rng.randrange(1, 200),
        }
        for c in filers
    ]
    social = [
        {
            "company_id": c["company_id"],
            "district": c["district"],
            "insured_staff": rng.randrange(1, 2500),
            "contributions_2025": rng.randrange(10_000, 9_000_000),
        }
        for c in rng.sample(registry, 2000)
    ]
    districts: dict[str, list[dict[str, Any]]] = {}
    for n, district in enumerate(DISTRICTS):
        size = (90, 70, 60)[n]
        firms = []
        for j in range(size):
            # xuhui has only three logistics firms: below its k of 5, that cell is zeroed
            choices = INDUSTRIES if district != "xuhui" else INDUSTRIES[:-1]
            firms.append(
                {
                    "enterprise_id": f"{district[:2].upper()}-{j:04d}",
                    "industry": rng.choice(choices),
                    "employees": rng.randrange(2, 2500),  # a few exceed the bound
                    "revenue_10k": rng.randrange(5, 40_000),
                }
            )
        if district == "xuhui":
            for j in range(3):
                firms.append(
                    {
                        "enterprise_id": f"XU-L{j:03d}",
                        "industry": "logistics",
                        "employees": rng.randrange(2, 300),
                        "revenue_10k": rng.randrange(5, 4_000),
                    }
                )
        districts[district] = firms

    registered = rng.sample(registry, N_REGISTERED_APPLICANTS)
    unknown = [_company_id(rng, "9132") for _ in range(N_APPLICANTS - N_REGISTERED_APPLICANTS)]
    pool = [str(c["company_id"]) for c in registered] + unknown
    rng.shuffle(pool)
    # typed by hand at a branch: some ids carry stray whitespace
    applicants = [(f"L-{i:05d}", f" {cid}\t" if i % 9 == 0 else cid) for i, cid in enumerate(pool)]
    in_tax = {str(r["company_id"]) for r in tax}
    known = [cid for cid in pool if cid in in_tax]
    shortlist = rng.sample(known, SHORTLIST)
    consented = shortlist[:CONSENTED]
    rng.shuffle(shortlist)  # the unconsented ones are spread through the request
    return City(registry, tax, social, districts, applicants, shortlist, consented)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_applicants(path: Path, applicants: Sequence[tuple[str, str]]) -> Path:
    return write_csv(path, [{"application": a, "company_id": c} for a, c in applicants])


# -- plaintext answers (what a trusted third party would compute; the demo made the data) ----


def _clamp(value: float, bounds: tuple[int, int]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def psi_truth(city: City) -> dict[str, int]:
    """Exact count and clamped tax total of the applicants the tax bureau knows."""
    ours = {cid.strip() for _, cid in city.applicants}
    hits = [r for r in city.tax if r["company_id"] in ours]
    registered = {c["company_id"] for c in city.registry}
    return {
        "registered": len(ours & registered),
        "count": len(hits),
        "tax_sum": int(sum(_clamp(r["tax_paid_2025"], TAX_BOUNDS["tax_paid_2025"]) for r in hits)),
    }


def linear_scores(
    city: City, ids: Sequence[str], features: Sequence[str], weights: Sequence[float], bias: float
) -> list[tuple[float, float]]:
    """(linear score, sum_j |w_j x_j|) per id, in plain Python floats (math.fsum)."""
    rows = {r["company_id"]: r for r in city.tax}
    out = []
    for cid in ids:
        terms = [w * float(rows[cid][f]) for f, w in zip(features, weights, strict=True)]
        out.append((math.fsum(terms) + bias, math.fsum(abs(t) for t in terms)))
    return out


def secure_sum_truth(city: City, cells: Sequence[str]) -> list[list[int]]:
    """Per cell: [firms, staff, revenue] over the districts, each district dropping its groups
    below k and clamping to the declared bounds, as the zones do."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for firms in city.districts.values():
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for f in firms:
            groups[f["industry"]].append(f)
        for industry, members in groups.items():
            if len(members) < DISTRICT_K:
                continue
            t = totals[industry]
            t[0] += len(members)
            t[1] += int(sum(_clamp(m["employees"], DISTRICT_BOUNDS["employees"]) for m in members))
            t[2] += int(
                sum(_clamp(m["revenue_10k"], DISTRICT_BOUNDS["revenue_10k"]) for m in members)
            )
    return [list(totals.get(c, [0, 0, 0])) for c in cells]
