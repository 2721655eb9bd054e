"""Data layer: native readers -> harmonised labels -> patient-disjoint splits -> window cache -> loader."""

from .record import EcgRecord, FRANK_LEADS, MIMIC_NATIVE_LEADS, PTB_LEADS, SITES, STANDARD_LEADS

__all__ = ["EcgRecord", "FRANK_LEADS", "MIMIC_NATIVE_LEADS", "PTB_LEADS", "SITES", "STANDARD_LEADS"]
