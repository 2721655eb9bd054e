"""Lead system: one 3-D cardiac dipole seen through the 12 standard leads and Frank's X, Y, Z.

The heart's electrical activity is, to first order, a single current dipole whose moment traces
a loop in space during each wave (vectorcardiography). Every surface lead reads the projection
of that dipole on its *lead vector*. Dower et al. (J Electrocardiol 1980; 13:189) measured the
lead vectors that map the Frank orthogonal leads X, Y, Z onto the eight independent leads of the
standard ECG; :data:`DOWER` is that matrix. We therefore generate the dipole in Frank
coordinates (the PTB records' ``vx, vy, vz``) and project it, which gives 15 leads that agree
with one another exactly as in a real recording.

Frank coordinates (the convention of the Dower paper):
  * x: towards the patient's **left**,
  * y: towards the **feet** (inferior),
  * z: towards the **back** (posterior); anterior leads (V1-V3) have negative z weights.

The four augmented/derived limb leads follow from I and II by Einthoven's and Goldberger's
relations (III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2), so they hold
exactly in every synthetic record, noise included (noise is generated per *electrode*).
"""

from __future__ import annotations

import numpy as np

#: Dower (1980) transfer matrix, Frank XYZ -> the 8 independent leads I, II, V1..V6 (rows).
DOWER: np.ndarray = np.array(
    [
        # X       Y       Z
        [0.632, -0.235, 0.059],   # I
        [0.235, 1.066, -0.132],   # II
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],   # V2
        [0.882, 0.098, -1.277],   # V3
        [1.213, 0.127, -0.601],   # V4
        [1.125, 0.127, -0.086],   # V5
        [0.831, 0.076, 0.230],    # V6
    ]
)

#: The eight independent leads (rows of :data:`DOWER`).
INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

#: Independent leads (I, II, V1..V6) -> the 12 standard leads in standard order.
#: Rows: I, II, III, aVR, aVL, aVF, V1..V6.
LIMB_TO_STANDARD: np.ndarray = np.zeros((12, 8))
LIMB_TO_STANDARD[0, 0] = 1.0                                   # I
LIMB_TO_STANDARD[1, 1] = 1.0                                   # II
LIMB_TO_STANDARD[2, [0, 1]] = (-1.0, 1.0)                      # III = II - I
LIMB_TO_STANDARD[3, [0, 1]] = (-0.5, -0.5)                     # aVR = -(I + II) / 2
LIMB_TO_STANDARD[4, [0, 1]] = (1.0, -0.5)                      # aVL = I - II / 2
LIMB_TO_STANDARD[5, [0, 1]] = (-0.5, 1.0)                      # aVF = II - I / 2
LIMB_TO_STANDARD[6:, 2:] = np.eye(6)                           # V1..V6

#: Electrodes -> independent leads. Electrodes: RA, LA, LL, C1..C6 (chest). Chest leads are
#: referred to Wilson's central terminal (RA + LA + LL) / 3.
ELECTRODES: tuple[str, ...] = ("RA", "LA", "LL", "C1", "C2", "C3", "C4", "C5", "C6")
ELECTRODE_TO_LEADS: np.ndarray = np.zeros((8, 9))
ELECTRODE_TO_LEADS[0, [0, 1]] = (-1.0, 1.0)                    # I = LA - RA
ELECTRODE_TO_LEADS[1, [0, 2]] = (-1.0, 1.0)                    # II = LL - RA
ELECTRODE_TO_LEADS[2:, 0:3] = -1.0 / 3.0                       # Vi = Ci - WCT
ELECTRODE_TO_LEADS[2:, 3:] = np.eye(6)


def lead_matrix(rng: np.random.Generator, placement_sd: float, site_offset: np.ndarray) -> np.ndarray:
    """The record's dipole -> independent-lead matrix ``[8, 3]``.

    Real electrodes are never placed exactly where Dower's torso model put them, and torsos
    differ: each record perturbs the precordial lead vectors multiplicatively (``placement_sd``)
    and each site adds its own systematic offset (``site_offset`` ``[8, 3]``, mostly on the
    chest leads: its technicians' habits, e.g. V1-V2 placed an intercostal space high, and
    its population's habitus).
    """
    m = DOWER * (1.0 + site_offset)
    jitter = rng.normal(0.0, placement_sd, size=(6, 3))
    m[2:] = m[2:] * (1.0 + jitter)
    return m
