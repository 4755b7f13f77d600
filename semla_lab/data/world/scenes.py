"""Layout grammars of the three scene kinds, rendered for a whole batch at once.

Everything is vectorised over the batch: per-image parameters are (B,) tensors drawn from one
seeded torch.Generator, shapes are masks over a shared (H, W) grid in [0, 1] coordinates, and
objects are painted back to front. A canvas keeps, per pixel, the colour, the concept id, a depth
(for fog), a light-emission map (for night) and a ground flag (where snow settles).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .concepts import CONCEPT_ID, STYLES

SKY_DEPTH = 60.0


class Canvas:
    """Per-pixel buffers of one batch. Colours are (B, 3, H, W) in [0, 1]; labels are concept ids."""

    def __init__(self, batch: int, size: int, style: str, gen: torch.Generator):
        self.B, self.size, self.gen = batch, size, gen
        self.palette = {k: torch.tensor(v) for k, v in STYLES[style]["colors"].items()}
        self.style = STYLES[style]
        axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self.Y, self.X = axis.view(1, -1, 1), axis.view(1, 1, -1)   # (1, H, 1), (1, 1, W)
        self.color = torch.zeros(batch, 3, size, size)
        self.label = torch.full((batch, size, size), 255, dtype=torch.uint8)
        self.depth = torch.full((batch, size, size), SKY_DEPTH)
        self.emit = torch.zeros(batch, size, size)
        self.ground = torch.zeros(batch, size, size)
        # one smooth texture field per image, shared by all surfaces (cheap and looks material-like)
        coarse = torch.randn(batch, 1, 8, 8, generator=gen)
        self.texture = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]

    def u(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        """Uniform samples of shape (B, *shape)."""
        return lo + (hi - lo) * torch.rand(self.B, *shape, generator=self.gen)

    def coin(self, p: float, *shape: int) -> torch.Tensor:
        return torch.rand(self.B, *shape, generator=self.gen) < p

    def base(self, concept: str, vary: float = 0.08) -> torch.Tensor:
        """(B, 3) colour of a concept in this style, varied per image."""
        c = self.palette[concept].expand(self.B, 3)
        return (c * (1 + vary * torch.randn(self.B, 3, generator=self.gen))).clamp(0, 1)

    def paint(self, mask: torch.Tensor, concept: str, color: torch.Tensor, depth,
              texture: float = 0.06, ground: bool = False, emit=None) -> None:
        """Paint `mask` (B, H, W) with `color` (B, 3) or (B, 3, H, W) at `depth` ((B,) or (B, H, W))."""
        mask = mask.expand(self.B, self.size, self.size)
        if color.dim() == 2:
            color = color[:, :, None, None]
        shaded = color * (1 + texture * self.texture[:, None])
        self.color = torch.where(mask[:, None], shaded.expand_as(self.color), self.color)
        self.label[mask] = CONCEPT_ID[concept]
        depth = torch.as_tensor(depth, dtype=torch.float32)
        depth = depth.view(-1, 1, 1) if depth.dim() == 1 else depth
        self.depth = torch.where(mask, depth.expand_as(self.depth), self.depth)
        self.ground = torch.where(mask, torch.tensor(float(ground)), self.ground)
        if emit is not None:
            self.emit = torch.where(mask, torch.as_tensor(emit).expand_as(self.emit), self.emit)


def _v(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1) for broadcasting against the pixel grid."""
    return t.view(-1, 1, 1)


def _sky(cv: Canvas, horizon: torch.Tensor) -> None:
    top = cv.base("sky")
    gradient = (cv.Y / _v(horizon).clamp(min=0.05)).clamp(0, 1)      # 0 at top, 1 at horizon
    color = top[:, :, None, None] * (0.85 + 0.3 * gradient[:, None])
    cv.paint(cv.Y < 2, "sky", color.clamp(0, 1), SKY_DEPTH, texture=0.02)


def _person(cv: Canvas, x, foot, height, present) -> None:
    """A standing person: torso + legs rectangle and a round head. All args (B,)."""
    x, foot, height = _v(x), _v(foot), _v(height)
    w = 0.28 * height
    body = (abs(cv.X - x) < w / 2) & (cv.Y > foot - 0.78 * height) & (cv.Y < foot)
    head = (cv.X - x) ** 2 + (cv.Y - (foot - 0.87 * height)) ** 2 < (0.12 * height) ** 2
    clothes = torch.rand(cv.B, 3, generator=cv.gen) * 0.7 + 0.1
    mask = (body | head) & _v(present)
    cv.paint(mask, "person", clothes, 1.0 / (foot.view(-1) - 0.3).clamp(min=0.05), texture=0.1)
    skin = torch.tensor([0.85, 0.65, 0.5]) * (0.5 + 0.5 * torch.rand(cv.B, 1, generator=cv.gen))
    cv.paint(head & _v(present), "person", skin, 1.0 / (foot.view(-1) - 0.3).clamp(min=0.05), texture=0.03)


def _tree(cv: Canvas, x, foot, size, present, depth) -> None:
    x, foot, size = _v(x), _v(foot), _v(size)
    trunk = (abs(cv.X - x) < 0.05 * size) & (cv.Y < foot) & (cv.Y > foot - 0.6 * size)
    crown_y = foot - 0.75 * size
    crown = ((cv.X - x) / 1.0) ** 2 + ((cv.Y - crown_y) / 1.2) ** 2 < (0.32 * size) ** 2
    cv.paint(trunk & _v(present), "vegetation", torch.tensor([0.35, 0.24, 0.12]).expand(cv.B, 3), depth)
    cv.paint(crown & _v(present), "vegetation", cv.base("vegetation", 0.15), depth, texture=0.25)


def render_street(cv: Canvas) -> None:
    B, st = cv.B, cv.style
    h, vx = cv.u(0.36, 0.48), cv.u(0.4, 0.6)
    rw, sw = cv.u(*st["road_width"]), cv.u(0.25, 0.5)
    _sky(cv, h)
    H, X, Y = _v(h), cv.X, cv.Y
    t = ((Y - H) / (1 - H)).clamp(min=0)                          # 0 at the horizon, 1 at the bottom
    ground_depth = 1.0 / (t + 0.03)
    below = Y > H
    off = abs(X - _v(vx))
    road_half, walk_half = _v(rw) * t, _v(rw * (1 + sw)) * t
    terrain = cv.coin(0.6)
    cv.paint(below & _v(terrain), "grass", cv.base("grass"), ground_depth, texture=0.2, ground=True)
    cv.paint(below & ~_v(terrain), "sidewalk", cv.base("sidewalk"), ground_depth, ground=True)
    # buildings stand on the outer sidewalk edge; heights grow towards the image border (perspective)
    edge_t = (off / _v(rw * (1 + sw) * 1.6)).clamp(max=1.5)
    bottom = H + edge_t * (1 - H)
    blocks = cv.u(0.5, 1.3, 16)
    block_id = ((off * 7 + _v(cv.u(0, 1))).floor().long().clamp(0, 15)).expand(B, cv.size, cv.size)
    block_h = torch.gather(blocks, 1, block_id.reshape(B, -1)).view_as(block_id)
    top = H - _v(cv.u(*st["building_height"])) * block_h * (off + 0.08) * 2.2
    corridor = _v(cv.u(0.03, 0.12))
    building = (Y >= top) & (Y < bottom) & (off > corridor) & cv.coin(0.92)[:, None, None]
    bcolor = cv.base("building", 0.15)[:, :, None, None]
    # window grid: darker glass on the facade, lit at night
    win = ((X * 40 + Y * 3) % 1 < 0.45) & ((Y * 30) % 1 < 0.5) & (Y < bottom - 0.03)
    shade = torch.where(win[:, None], 0.65, 1.0)   # (1, 1, H, W)
    lit = torch.rand(B, 1, 1, generator=cv.gen) < 0.5
    cv.paint(building, "building", (bcolor * shade).expand(B, 3, cv.size, cv.size),
             1.0 / (bottom - H + 0.03), texture=0.08, emit=(win & lit).float() * 0.8)
    cv.paint(below & (off < walk_half), "sidewalk", cv.base("sidewalk"), ground_depth, ground=True)
    road_col = cv.base("road")[:, :, None, None]
    marking = (abs(X - _v(vx)) < 0.012 * (t + 0.2)) & ((t * 12 + 0.3) % 1 < 0.5)
    road_col = torch.where(marking[:, None], torch.tensor(0.85).view(1, 1, 1, 1), road_col)
    cv.paint(below & (off < road_half), "road", road_col.expand(B, 3, cv.size, cv.size).clone(),
             ground_depth, texture=0.1, ground=True)

    # poles and trees on the sidewalks, cars on the road, pedestrians on the sidewalks: far to near
    for k in range(3):
        tk = cv.u(0.12 + 0.25 * k, 0.3 + 0.25 * k)
        side = torch.where(cv.coin(0.5), 1.0, -1.0)
        foot = h + tk * (1 - h)
        xs = vx + side * rw * tk * (1 + 0.6 * sw)
        depth = 1.0 / (tk + 0.03)
        _tree(cv, xs + side * rw * tk * 0.5 * sw, foot, 0.9 * tk + 0.05, cv.coin(0.55), depth)
        pole_h = 0.85 * tk + 0.05
        pole = (abs(X - _v(xs)) < 0.006 + 0.012 * _v(tk)) & (Y < _v(foot)) & (Y > _v(foot - pole_h))
        has_pole = cv.coin(0.6)
        lamp = ((X - _v(xs)) ** 2 + (Y - _v(foot - pole_h)) ** 2 < (0.02 + 0.015 * _v(tk)) ** 2)
        cv.paint(pole & _v(has_pole), "pole", cv.base("pole"), depth, texture=0.03)
        cv.paint(lamp & _v(has_pole), "pole", cv.base("pole"), depth, emit=1.0)
    for k in range(st["cars"]):
        tk = cv.u(0.1 + 0.8 * k / st["cars"], 0.1 + 0.8 * (k + 0.8) / st["cars"])
        lane = torch.where(cv.coin(0.5), 0.45, -0.45)
        foot = h + tk * (1 - h)
        xc, wc = vx + lane * rw * tk, 0.9 * rw * tk
        xc, foot_, wc_ = _v(xc), _v(foot), _v(wc)
        body = (abs(X - xc) < wc_ / 2) & (Y < foot_ - 0.05 * wc_) & (Y > foot_ - 0.35 * wc_)
        cabin = (abs(X - xc) < wc_ * 0.32) & (Y <= foot_ - 0.35 * wc_) & (Y > foot_ - 0.58 * wc_)
        wheels = (abs(abs(X - xc) - wc_ * 0.32) < wc_ * 0.09) & (Y >= foot_ - 0.1 * wc_) & (Y < foot_)
        lights = (abs(abs(X - xc) - wc_ * 0.38) < wc_ * 0.07) & (abs(Y - (foot_ - 0.2 * wc_)) < wc_ * 0.05)
        present = _v(cv.coin(0.75))
        depth = 1.0 / (tk + 0.03)
        paint_col = torch.rand(B, 3, generator=cv.gen) * 0.8 + 0.1
        cv.paint((body | wheels) & present, "car", paint_col, depth, texture=0.05)
        cv.paint(wheels & present, "car", torch.full((B, 3), 0.08), depth, texture=0.0)
        cv.paint(cabin & present, "car", paint_col * 0.45 + 0.15, depth, texture=0.05)
        cv.paint(lights & present, "car", torch.tensor([0.95, 0.9, 0.7]).expand(B, 3), depth, emit=1.0)
    for k in range(st["people"]):
        tk = cv.u(0.15 + 0.8 * k / st["people"], 0.15 + 0.8 * (k + 0.9) / st["people"])
        side = torch.where(cv.coin(0.5), 1.0, -1.0)
        foot = h + tk * (1 - h)
        xp = vx + side * rw * tk * (1 + 0.5 * sw) + cv.u(-0.02, 0.02)
        _person(cv, xp, foot, 0.55 * tk + 0.04, cv.coin(0.7))


def render_indoor(cv: Canvas) -> None:
    B = cv.B
    vx, vy = cv.u(0.38, 0.62), cv.u(0.38, 0.5)
    bw, top, bot = cv.u(0.18, 0.3), cv.u(0.15, 0.25), cv.u(0.15, 0.25)
    X, Y = cv.X, cv.Y
    dx, dy = X - _v(vx), Y - _v(vy)
    rx, ry_top, ry_bot = abs(dx) / _v(bw), -dy / _v(top), dy / _v(bot)
    back = (rx <= 1) & (ry_top <= 1) & (ry_bot <= 1)
    floor = ~back & (ry_bot >= rx) & (dy > 0)
    ceiling = ~back & (ry_top >= rx) & (dy < 0)
    walls = ~back & ~floor & ~ceiling
    back_depth = 6.0
    wall_col = cv.base("wall", 0.1)
    cv.paint(back, "wall", wall_col, back_depth, texture=0.05)
    cv.paint(walls, "wall", wall_col * 0.85, back_depth / rx.clamp(min=1), texture=0.05)
    cv.paint(floor, "floor", cv.base("floor", 0.15), back_depth / ry_bot.clamp(min=1), texture=0.2, ground=True)
    cv.paint(ceiling, "ceiling", cv.base("ceiling", 0.03), back_depth / ry_top.clamp(min=1), texture=0.02)
    floor_line = _v(vy + bot)                                # where the back wall meets the floor
    # a window and a door on the back wall
    wx, wwid = cv.u(-0.6, 0.2) * bw + vx, cv.u(0.3, 0.5) * bw
    window = (X > _v(wx)) & (X < _v(wx + wwid)) & (Y > _v(vy - 0.7 * top)) & (Y < _v(vy + 0.2 * bot))
    cv.paint(window & back & _v(cv.coin(0.85)), "window", cv.base("window"), back_depth, texture=0.02,
             emit=0.0)
    dxp = cv.u(0.25, 0.7) * bw + vx
    door = (abs(X - _v(dxp)) < _v(0.18 * bw)) & (Y > _v(vy - 0.3 * top)) & (Y < floor_line)
    cv.paint(door & back & _v(cv.coin(0.7)), "door", cv.base("door", 0.1), back_depth, texture=0.05)
    # furniture on the floor, far to near; `near` in [0, 1] scales size and vertical position
    def place(lo, hi):
        near = cv.u(lo, hi)
        foot = vy + bot + near * (1 - vy - bot)
        return near, foot, 1.0 / (near + 0.15)
    near, foot, depth = place(0.0, 0.3)
    xs, s = cv.u(0.15, 0.85), 0.25 + 0.4 * near
    sofa_seat = (abs(X - _v(xs)) < _v(0.5 * s)) & (Y < _v(foot)) & (Y > _v(foot - 0.18 * s))
    sofa_back = (abs(X - _v(xs)) < _v(0.5 * s)) & (Y <= _v(foot - 0.18 * s)) & (Y > _v(foot - 0.4 * s))
    has = _v(cv.coin(0.7))
    cv.paint((sofa_seat | sofa_back) & has, "sofa", cv.base("sofa", 0.25), depth, texture=0.1)
    near, foot, depth = place(0.1, 0.35)
    xl = cv.u(0.08, 0.92)
    lamp_pole = (abs(X - _v(xl)) < 0.008 + 0.01 * _v(near)) & (Y < _v(foot)) & (Y > _v(foot - 0.45 - 0.2 * near))
    shade = (abs(X - _v(xl)) < _v(0.04 + 0.03 * near)) & (abs(Y - _v(foot - 0.47 - 0.2 * near)) < 0.035)
    has = _v(cv.coin(0.7))
    cv.paint(lamp_pole & has, "lamp", torch.full((B, 3), 0.3), depth)
    cv.paint(shade & has, "lamp", cv.base("lamp"), depth, emit=1.0)
    near, foot, depth = place(0.35, 0.7)
    xt, s = cv.u(0.25, 0.75), 0.3 + 0.4 * near
    table_top = (abs(X - _v(xt)) < _v(0.5 * s)) & (abs(Y - _v(foot - 0.3 * s)) < _v(0.04 * s + 0.01))
    legs = (abs(abs(X - _v(xt)) - _v(0.42 * s)) < _v(0.03 * s + 0.004)) & (Y > _v(foot - 0.3 * s)) & (Y < _v(foot))
    has = _v(cv.coin(0.8))
    cv.paint((table_top | legs) & has, "table", cv.base("table", 0.2), depth, texture=0.15)
    for k in range(2):
        xc = xt + torch.where(cv.coin(0.5), 1.0, -1.0) * s * cv.u(0.55, 0.8)
        c_seat = (abs(X - _v(xc)) < _v(0.13 * s)) & (abs(Y - _v(foot - 0.16 * s)) < _v(0.025 * s + 0.008))
        c_back = (abs(X - _v(xc + 0.1 * s)) < _v(0.025 * s + 0.006)) & (Y < _v(foot - 0.16 * s)) & (Y > _v(foot - 0.5 * s))
        c_legs = (abs(abs(X - _v(xc)) - _v(0.11 * s)) < _v(0.015 * s + 0.004)) & (Y > _v(foot - 0.16 * s)) & (Y < _v(foot))
        cv.paint((c_seat | c_back | c_legs) & _v(cv.coin(0.7)), "chair", cv.base("chair", 0.2), depth - 0.1)
    near, foot, _ = place(0.4, 0.95)
    _person(cv, cv.u(0.1, 0.9), foot, 0.3 + 0.3 * near, cv.coin(0.6))


def render_park(cv: Canvas) -> None:
    B = cv.B
    h = cv.u(0.38, 0.52)
    _sky(cv, h)
    X, Y, H = cv.X, cv.Y, _v(h)
    ridge = torch.zeros(B, 1, cv.size)
    for k in range(3):          # mountain silhouette from a few random sinusoids
        freq, phase, amp = cv.u(3, 12) * (k + 1), cv.u(0, 2 * math.pi), cv.u(0.01, 0.06) / (k + 1)
        ridge = ridge + _v(amp) * torch.sin(_v(freq) * X + _v(phase))
    mountain_top = H - _v(cv.u(0.06, 0.2)) - ridge
    cv.paint((Y > mountain_top) & (Y <= H) & _v(cv.coin(0.8)), "mountain", cv.base("mountain"), 30.0,
             texture=0.15, ground=True)
    t = ((Y - H) / (1 - H)).clamp(min=0)
    ground_depth = 1.0 / (t + 0.03)
    cv.paint(Y > H, "grass", cv.base("grass", 0.12), ground_depth, texture=0.25, ground=True)
    cx, rx, ry = cv.u(0.2, 0.8), cv.u(0.15, 0.4), cv.u(0.04, 0.1)
    lake = ((X - _v(cx)) / _v(rx)) ** 2 + ((Y - H - _v(ry) * 0.9) / _v(ry)) ** 2 < 1
    cv.paint(lake & (Y > H) & _v(cv.coin(0.6)), "water", cv.base("water"), ground_depth, texture=0.1)
    bend, px = cv.u(-0.25, 0.25), cv.u(0.35, 0.65)
    path_x = _v(px) + _v(bend) * torch.sin(3.0 * t)
    path = (Y > H) & (abs(X - path_x) < 0.01 + 0.16 * t)
    cv.paint(path & _v(cv.coin(0.75)), "path", cv.base("path", 0.1), ground_depth, texture=0.2, ground=True)
    for k in range(4):
        tk = cv.u(0.05 + 0.22 * k, 0.2 + 0.22 * k)
        foot = h + tk * (1 - h)
        xt = cv.u(0.0, 1.0)
        _tree(cv, xt, foot, 1.0 * tk + 0.08, cv.coin(0.65), 1.0 / (tk + 0.03))
        xr, rr = cv.u(0.0, 1.0), 0.02 + 0.08 * tk
        rock = ((X - _v(xr)) / _v(rr * 1.4)) ** 2 + ((Y - _v(foot - rr * 0.5)) / _v(rr)) ** 2 < 1
        cv.paint(rock & (Y < _v(foot)) & _v(cv.coin(0.4)), "rock", cv.base("rock", 0.15),
                 1.0 / (tk + 0.03), texture=0.2)
    tb = cv.u(0.3, 0.7)
    foot, s = h + tb * (1 - h), 0.25 * tb + 0.05
    xb = px + torch.where(cv.coin(0.5), 1.0, -1.0) * (0.05 + 0.2 * tb)
    seat = (abs(X - _v(xb)) < _v(s)) & (abs(Y - _v(foot - 0.35 * s)) < _v(0.06 * s + 0.006))
    back = (abs(X - _v(xb)) < _v(s)) & (Y < _v(foot - 0.4 * s)) & (Y > _v(foot - 0.7 * s))
    legs = (abs(abs(X - _v(xb)) - _v(0.85 * s)) < _v(0.05 * s + 0.005)) & (Y > _v(foot - 0.35 * s)) & (Y < _v(foot))
    cv.paint((seat | back | legs) & _v(cv.coin(0.6)), "bench", cv.base("bench", 0.15), 1.0 / (tb + 0.03))
    for k in range(2):
        tp = cv.u(0.2 + 0.4 * k, 0.5 + 0.4 * k)
        foot = h + tp * (1 - h)
        _person(cv, px + cv.u(-0.25, 0.25), foot, 0.5 * tp + 0.05, cv.coin(0.55))


RENDERERS = {"street": render_street, "indoor": render_indoor, "park": render_park}
