"""Appearance factors applied to a rendered canvas: time of day, weather, then the camera.

Each factor is a per-image intensity tensor (B,), so one batch can mix conditions. Labels never
change: fog, rain, snow and darkness only alter what the camera sees, as in ACDC.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scenes import SKY_DEPTH, Canvas


def _v(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur (B, C, H, W) with a per-image Gaussian of std `sigma` (B,) pixels (0 = untouched)."""
    radius = int(torch.ceil(3 * sigma.max()).item()) if sigma.numel() else 0
    if radius == 0:
        return img
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                     # (B, K)
    B, C, H, W = img.shape
    grouped = img.reshape(1, B * C, H, W)
    kx = k.repeat_interleave(C, 0)[:, None, None, :]                   # (B*C, 1, 1, K)
    grouped = F.conv2d(F.pad(grouped, (radius, radius, 0, 0), mode="replicate"), kx, groups=B * C)
    grouped = F.conv2d(F.pad(grouped, (0, 0, radius, radius), mode="replicate"),
                       kx.transpose(2, 3), groups=B * C)
    out = grouped.view(B, C, H, W)
    return torch.where(_v(sigma > 0.05), out, img)


def apply_time_of_day(cv: Canvas, dusk: torch.Tensor, night: torch.Tensor, indoor: torch.Tensor) -> torch.Tensor:
    """Dim and tint the scene; at night light sources (lamps, lit windows, headlights) glow."""
    img = cv.color
    is_sky = (cv.label == 0)[:, None]
    warm = torch.tensor([1.15, 0.82, 0.62]).view(1, 3, 1, 1)
    cold = torch.tensor([0.65, 0.75, 1.15]).view(1, 3, 1, 1)
    outdoor_night = night * (1 - 0.45 * indoor)                         # rooms keep some light on
    gain = (1 - 0.45 * dusk - 0.85 * outdoor_night).clamp(min=0.06)
    tint = 1 + _v(dusk) * (warm - 1) + _v(outdoor_night) * (cold - 1)
    img = img * _v(gain) * tint
    dusk_sky = torch.tensor([0.95, 0.55, 0.35]).view(1, 3, 1, 1)
    night_sky = torch.tensor([0.03, 0.04, 0.10]).view(1, 3, 1, 1)
    sky = cv.color * (1 - _v(dusk) * 0.6) + _v(dusk) * 0.6 * dusk_sky
    sky = sky * (1 - _v(night)) + _v(night) * night_sky
    img = torch.where(is_sky, sky, img)
    is_window = (cv.label == 12)[:, None]          # indoor windows show the dark sky at night
    img = torch.where(is_window, img * (1 - 0.8 * _v(night)), img)
    light = torch.tensor([1.0, 0.85, 0.55]).view(1, 3, 1, 1)
    glow = gaussian_blur(cv.emit[:, None], torch.full((cv.B,), 1.5 * cv.size / 64))
    return img + _v(night) * light * (cv.emit[:, None] * 0.9 + glow * 0.8)


def apply_weather(cv: Canvas, img: torch.Tensor, fog, rain, snow, indoor, brightness) -> torch.Tensor:
    B, S = cv.B, cv.size
    outdoor = 1 - indoor
    # snow settles on ground surfaces in patches, falls as flakes, and greys the sky
    patches = (0.6 + 0.4 * cv.texture[:, None]).clamp(0, 1)
    cover = _v(snow * outdoor) * cv.ground[:, None] * patches
    img = img * (1 - cover) + cover * 0.92 * _v(brightness)
    # rain darkens and wets (more contrast on the ground), greys the sky, and draws streaks
    wet = _v(rain * outdoor)
    img = img * (1 - 0.3 * wet) - 0.08 * wet * cv.ground[:, None] * img
    grey = torch.tensor([0.62, 0.64, 0.68]).view(1, 3, 1, 1) * _v(brightness)
    overcast = _v((0.7 * rain + 0.6 * snow).clamp(max=1) * outdoor)
    img = torch.where((cv.label == 0)[:, None], img * (1 - overcast) + grey * overcast, img)
    # fog: transmission falls with depth (Koschmieder), airlight grey scaled by the light level
    beta = _v(fog * outdoor + 0.2 * fog * indoor) * 0.6
    trans = torch.exp(-beta * cv.depth[:, None].clamp(max=SKY_DEPTH) * 0.5)
    airlight = torch.tensor([0.78, 0.80, 0.84]).view(1, 3, 1, 1) * _v(brightness)
    img = img * trans + airlight * (1 - trans)
    # precipitation particles: sparse random streaks (rain) and dots (snow), scaled with size
    noise = torch.rand(B, 1, S, S, generator=cv.gen)
    streak_len = max(3, S // 12)
    streak_len += 1 - streak_len % 2                       # odd, so "same" padding is exact
    k = torch.zeros(1, 1, streak_len, streak_len)
    k[0, 0, torch.arange(streak_len), torch.arange(streak_len).flip(0) // 3 + streak_len // 3] = 1.0
    streaks = F.conv2d((noise > 0.985).float(), k, padding="same").clamp(max=1)
    img = img + _v(rain * outdoor) * 0.35 * streaks * _v(brightness + 0.2)
    flakes = (noise < 0.03 * _v(snow * outdoor)).float()
    if S > 64:
        flakes = F.max_pool2d(flakes, 3, 1, 1)
    return img * (1 - flakes) + flakes * 0.95


def apply_camera(img: torch.Tensor, gen: torch.Generator, noise, blur, exposure, cast, resolution) -> torch.Tensor:
    """Sensor effects in the order light meets them: optics blur, resolution, exposure, white
    balance, noise, 8-bit quantisation. `cast` is (B, 3); others (B,)."""
    B, _, S, _ = img.shape
    img = gaussian_blur(img, blur * S / 64)
    low = resolution < 0.999
    if low.any():
        for r in resolution[low].unique():
            idx = (resolution == r).nonzero().view(-1)
            small = max(4, int(round(S * r.item())))
            down = F.interpolate(img[idx], size=(small, small), mode="area")
            img[idx] = F.interpolate(down, size=(S, S), mode="bilinear", align_corners=False)
    img = img * _v(exposure) * cast[:, :, None, None]
    img = img + _v(noise) * torch.randn(img.shape, generator=gen)
    return img.clamp(0, 1)
