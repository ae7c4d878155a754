"""Dollar cost of a run from its step time and an hourly price."""

from sdtune.errors import UserError

# On-demand hourly prices (USD) in us-central1, VM + attached GPUs, no sustained-use or committed
# discounts. Recalled from the GCP pricing page, not fetched (this project builds offline):
# approximate, check https://cloud.google.com/compute/gpus-pricing before quoting them.
PRICES_AS_OF = "2025-01"  # approximate
PRICES = {  # gpus: what the machine type holds, for the reader
    "g2-standard-4": {"usd_per_hour": 0.71, "gpus": "1x NVIDIA L4"},
    "g2-standard-8": {"usd_per_hour": 0.85, "gpus": "1x NVIDIA L4"},
    "g2-standard-16": {"usd_per_hour": 1.15, "gpus": "1x NVIDIA L4"},
    # The multi-L4 types the README offers for more GPUs, recalled from the same page and date. G2 prices
    # grow linearly in L4s and in vCPUs (4 GB each): each is within 1% of what the rows above imply.
    "g2-standard-24": {"usd_per_hour": 1.99, "gpus": "2x NVIDIA L4"},
    "g2-standard-48": {"usd_per_hour": 3.99, "gpus": "4x NVIDIA L4"},
    "g2-standard-96": {"usd_per_hour": 7.98, "gpus": "8x NVIDIA L4"},
    "a2-highgpu-1g": {"usd_per_hour": 3.67, "gpus": "1x NVIDIA A100 40GB"},
    "a2-ultragpu-1g": {"usd_per_hour": 5.07, "gpus": "1x NVIDIA A100 80GB"},
    "a3-highgpu-8g": {"usd_per_hour": 88.49, "gpus": "8x NVIDIA H100 80GB"},
}
REGION = "us-central1"


def hourly_price(machine_type: str) -> float:
    """The table's hourly USD price of a machine type; a clear error for one not in it."""
    if machine_type not in PRICES:
        raise UserError(f"params.yaml: profile.machine_type: no price for {machine_type!r} in the price table "
                        f"(priced: {', '.join(PRICES)}); set profile.usd_per_hour to its hourly price in USD")
    return PRICES[machine_type]["usd_per_hour"]


def hourly_usd(profile) -> float:
    """The hourly price the profile stage charges: profile.usd_per_hour, else the table's."""
    return profile.usd_per_hour or hourly_price(profile.machine_type)


def price_source(profile) -> str:
    """Where hourly_usd's price came from, for the reports: the param, or the table's entry and date."""
    if profile.usd_per_hour:
        return "profile.usd_per_hour"
    return f"{profile.machine_type}'s approximate on-demand price in {REGION}, {PRICES_AS_OF}"


def cost(step_seconds: float, steps: int, hourly_usd: float) -> dict:
    """USD per 1000 steps and for `steps` steps, at `hourly_usd` for the machine's wall time.

    Counts training steps only: start-up, data caching and evaluation are extra.
    """
    usd_per_second = hourly_usd / 3600
    return {
        "usd_per_1000_steps": step_seconds * 1000 * usd_per_second,
        "usd_per_run": step_seconds * steps * usd_per_second,
    }
