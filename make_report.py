"""Build the study's report.pdf from finished run folders: every figure, metric table and written answer.

    python make_report.py plots/vae plots/ddpm plots/ddpm-recipes plots/ddpm-compare plots/ddpm-probe plots/simsiam \
        --out plots/report.pdf

Reads only each run folder's summary.json (docs/operations.md, "The run folder") and the written answers in
report/answers.md. An answer cites measured numbers through placeholders, {{RUN.KEY.SUBKEY:FORMAT}}: RUN is a
summary's "model" (vae, ddpm, ddpm-recipes, ddpm-compare, ddpm-probe, simsiam), the dotted keys walk its
"metrics" (a number picks a list's entry) and FORMAT is an optional Python format spec, so the text never drifts
from the runs. A run that was not given shows as "not run yet: <command>" wherever it is needed; the report is still
built. Each problem's section
states the scale of its runs and the command of the full-size GPU run.

Every user error is one line (exit status 2) before the slow work: an --out that cannot be written (empty, a folder,
below a file, a forbidden or read-only place, an existing file that is not a PDF), a summary.json that is not a
run summary (naming the file and the key), a figure that a summary lists but that is missing, truncated or not an
image. The PDF is written through a temp file and os.replace: a failure leaves the previous report intact.
"""
import argparse
import html
import io
import os
import re
import sys
import time
import zlib

from studylib import UserError
from studylib.run import HelpFormatter, read_summary, user_errors, write_atomically

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ANSWERS = os.path.join(ROOT, 'report', 'answers.md')

PROBLEMS = [
    ('Problem 1: a variational autoencoder on SVHN', ['vae'],
     ['1.3a', '1.3b', '1.3c', '1.3d', '1.3e', '1.3f']),
    ('Problem 2: a denoising diffusion model on SVHN', ['ddpm', 'ddpm-recipes', 'ddpm-compare', 'ddpm-probe'],
     ['2.2a', '2.2b', '2.2c', '2.2d', '2.2e', '2.3a', '2.3b']),
    ('Problem 3: SimSiam on CIFAR-10', ['simsiam'],
     ['3.4', '3.5a', '3.5b', '3.5c', '3.6', '3.7', '3.8', '3.9']),
]
QUESTION_IDS = [qid for _, _, ids in PROBLEMS for qid in ids]
# The run whose figures answer each question; the others are written answers only.
FIGURE_SOURCE = {**{q: 'vae' for q in QUESTION_IDS if q.startswith('1.')},
                 **{q: 'ddpm' for q in ('2.2a', '2.2b', '2.2c', '2.2d')},
                 '2.2e': 'ddpm-recipes', '2.3a': 'ddpm-compare', '2.3b': 'ddpm-probe',
                 '3.4': 'simsiam', '3.5a': 'simsiam', '3.5b': 'simsiam'}
HOW_TO_RUN = {
    'vae': 'python train_vae.py --out-dir runs/vae',
    'ddpm': 'python train_ddpm.py --compare-vae runs/vae --out-dir runs/ddpm',
    'ddpm-recipes': 'python train_ddpm.py --recipe cpu --sample-every 4 --out-dir runs/ddpm, the same with '
                    '--recipe assignment --sampler ddim --clip-denoised --out-dir runs/ddpm-assignment, then python '
                    'compare_ddpm.py --by recipe runs/ddpm-assignment runs/ddpm --out-dir runs/ddpm-recipes',
    'ddpm-compare': 'python train_ddpm.py --timesteps 500 --out-dir runs/ddpm-T500, the same with --timesteps 1500 '
                    '--out-dir runs/ddpm-T1500, then python compare_ddpm.py runs/ddpm-T500 runs/ddpm '
                    'runs/ddpm-T1500 --out-dir runs/ddpm-compare',
    'ddpm-probe': 'python probe_ddpm.py --ddpm runs/ddpm --vae runs/vae --out-dir runs/ddpm-probe',
    'simsiam': 'python train_simsiam.py --experiment all --out-dir runs/simsiam',
}
RUN_TITLES = {'vae': 'VAE run', 'ddpm': 'DDPM run', 'ddpm-recipes': '2.2e: DDPM training recipes at equal wall time',
              'ddpm-compare': '2.3a: DDPM runs against T',
              'ddpm-probe': '2.3b: linear probe of frozen features', 'simsiam': 'SimSiam runs'}
PLACEHOLDER = re.compile(r'\{\{\s*([A-Za-z0-9_.-]+?)\s*(?::([^}]*))?\}\}')
EMBED_DPI = 130   # the most pixels per inch a figure keeps in the PDF
MISSING = '\x00'   # marks text that reports a missing run or number, rendered in red


# ---------------------------------------------------------------------------------------------- reading the inputs

def read_runs(run_dirs):
    """{model: (run folder, summary)}; of several DDPM runs the T=1000 one (the seed's) answers 2.2."""
    runs = {}
    for path in run_dirs:
        summary = read_summary(path, hint='pass finished run folders (train_*.py, compare_ddpm.py, probe_ddpm.py)')
        key = summary['model']
        if key in runs:
            if key != 'ddpm':
                raise UserError(f'two {key} runs given ({runs[key][0]} and {path}): pass one')
            if runs[key][1]['metrics'].get('timesteps') == 1000:
                continue
        runs[key] = (path, summary)
    return runs


def check_out(path):
    """--out must name a PDF file that can be written: checked (its folder made) before any run is read, so that a
    typo costs no build. An existing file is replaced only when it is a PDF (or empty): never a summary or a
    figure given by mistake."""
    if not path or not path.strip():
        raise UserError('--out is empty: name the PDF to write, e.g. --out report.pdf')
    if os.path.isdir(path) or not os.path.basename(path):
        raise UserError(f'--out {path} is a folder: name the PDF file to write, e.g. '
                        f'--out {os.path.join(path, "report.pdf")}')
    folder = os.path.dirname(os.path.abspath(path))
    ancestor = folder
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f'--out {path} lies below {ancestor}, which is a file, not a folder: choose another --out')
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            with open(path, 'rb') as f:
                is_pdf = f.read(5) == b'%PDF-'
        except OSError as exc:
            raise UserError(f'--out {path} cannot be read ({exc.strerror or exc}): choose another --out') from exc
        if not is_pdf:
            raise UserError(f'--out {path} exists and is not a PDF: it would be replaced; choose another --out '
                            f'(or delete that file)')
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.{os.path.basename(path)}.write-test-{os.getpid()}')
        with open(probe, 'wb') as f:
            f.write(b'ok')
        os.remove(probe)
    except OSError as exc:
        raise UserError(f'--out {path} cannot be written ({exc.strerror or exc}): choose another --out, or fix '
                        f'the permissions of {folder} or free space') from exc


def embedded_figures(runs):
    """(question id, run folder, file name) of every figure the report embeds."""
    for qid in QUESTION_IDS:
        source = FIGURE_SOURCE.get(qid)
        if source in runs:
            path, summary = runs[source]
            for name in summary['figures'].get(qid, []):
                yield qid, path, name


def check_figures(runs):
    """Every figure the report embeds exists and decodes to its end (a PNG cut short by a full disk or a killed
    copy, or another file under a .png name, would otherwise fail deep inside the PDF build)."""
    from PIL import Image as PILImage
    for qid, path, name in embedded_figures(runs):
        file = os.path.join(path, name)
        listed = f'listed for {qid} in {os.path.join(path, "summary.json")}'
        if not os.path.isfile(file):
            raise UserError(f'figure {file} ({listed}) is missing: restore it, or rerun the run that made it')
        try:
            with PILImage.open(file) as img:
                img.verify()          # every chunk's checksum, up to the end marker
            with PILImage.open(file) as img:
                img.load()            # and every pixel
        except Exception as exc:   # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f'figure {file} ({listed}) is truncated or not a PNG image ({why}): rerun the run that '
                            f'made it, or restore the file') from exc


def parse_answers(text):
    """answers.md -> ({question id: (title, markdown body)}, references markdown)."""
    answers, references = {}, ''
    for block in re.split(r'^## ', text, flags=re.M)[1:]:
        heading, _, body = block.partition('\n')
        qid, _, title = heading.strip().partition(' ')
        if qid == 'References':
            references = body.strip()
        else:
            answers[qid] = (title.strip(), body.strip())
    return answers, references


def lookup(runs, path, spec, told=None):
    """The text of one placeholder: the formatted number, or a marked note of what is missing (the command that
    makes a missing run is given once per answer: `told` holds the runs already explained)."""
    key, *keys = path.split('.')
    if key not in runs:
        if told is not None and key in told:
            return MISSING + 'not run yet' + MISSING
        if told is not None:
            told.add(key)
        return MISSING + f'not run yet: {HOW_TO_RUN.get(key, key)}' + MISSING
    value = runs[key][1]['metrics']
    for k in keys:
        if isinstance(value, list) and k.isdigit() and int(k) < len(value):   # a list's entry by its index
            value = value[int(k)]
            continue
        if not isinstance(value, dict) or k not in value:
            if key == 'simsiam' and value is runs[key][1]['metrics']:   # a configuration the experiment lacks
                if told is not None and f'{key}.{k}' in told:
                    return MISSING + 'not run yet' + MISSING
                if told is not None:
                    told.add(f'{key}.{k}')
                return MISSING + f'not run yet: configuration {k} ({HOW_TO_RUN["simsiam"]})' + MISSING
            return MISSING + f'not measured in {runs[key][0]}' + MISSING
        value = value[k]
    if isinstance(value, list):
        return ', '.join(format_value(v, spec) for v in value)
    return format_value(value, spec)


def format_value(value, spec=None):
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            pass
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return ', '.join(format_value(v) for v in value)   # a curve: [433.16255518336345, ...] reads as 433.2, ...
    return str(value)


def fill(text, runs):
    told = set()
    return PLACEHOLDER.sub(lambda m: lookup(runs, m.group(1), m.group(2), told), text)


# ------------------------------------------------------------------------------------------------------ rendering

def fonts():
    """DejaVu (shipped with matplotlib) covers the Greek and maths symbols the answers use; Helvetica does not."""
    import matplotlib
    from reportlab.lib.fonts import addMapping
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont
    folder = os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data', 'fonts', 'ttf')
    for name, file, bold, italic in [('DejaVu', 'DejaVuSans', 0, 0), ('DejaVu-B', 'DejaVuSans-Bold', 1, 0),
                                     ('DejaVu-I', 'DejaVuSans-Oblique', 0, 1),
                                     ('DejaVu-BI', 'DejaVuSans-BoldOblique', 1, 1),
                                     ('DejaVuMono', 'DejaVuSansMono', 0, 0)]:
        if name not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(TTFont(name, os.path.join(folder, file + '.ttf')))
        if name != 'DejaVuMono':
            addMapping('DejaVu', bold, italic, name)


def make_styles():
    from reportlab.lib.colors import HexColor
    from reportlab.lib.styles import ParagraphStyle
    base = ParagraphStyle('body', fontName='DejaVu', fontSize=9.5, leading=13, spaceAfter=5)
    return {
        'body': base,
        'title': ParagraphStyle('title', base, fontName='DejaVu-B', fontSize=20, leading=26, spaceAfter=12),
        'h1': ParagraphStyle('h1', base, fontName='DejaVu-B', fontSize=15, leading=20, spaceBefore=6, spaceAfter=8),
        'h2': ParagraphStyle('h2', base, fontName='DejaVu-B', fontSize=12, leading=16, spaceBefore=10,
                             spaceAfter=5, textColor=HexColor('#1f3b73'), keepWithNext=1),
        'h3': ParagraphStyle('h3', base, fontName='DejaVu-B', fontSize=10, leading=13, spaceBefore=6,
                             keepWithNext=1),
        'bullet': ParagraphStyle('bullet', base, leftIndent=14, bulletIndent=4, spaceAfter=2),
        'caption': ParagraphStyle('caption', base, fontSize=7.5, leading=9.5, textColor=HexColor('#444444'),
                                  spaceAfter=8),
        'cell': ParagraphStyle('cell', base, fontSize=7.5, leading=9.5, spaceAfter=0),
        'missing': ParagraphStyle('missing', base, textColor=HexColor('#b00000')),
    }


def inline(text):
    """The answers' markdown subset (**bold**, *italic*, `code`) and missing-value marks -> reportlab markup."""
    text = html.escape(text, quote=False)
    text = re.sub(r'`([^`]+)`', r'<font face="DejaVuMono">\1</font>', text)
    text = re.sub(r'\*\*(.+?)\*\*', r'<b>\1</b>', text)
    text = re.sub(r'(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])', r'<i>\1</i>', text)
    return re.sub(MISSING + '(.*?)' + MISSING, r'<font color="#b00000"><i>[\1]</i></font>', text)


def markdown(text, styles):
    from reportlab.platypus import Paragraph
    out = []
    for block in re.split(r'\n\s*\n', text.strip()):
        lines = block.split('\n')
        if lines[0].lstrip().startswith('- '):   # a list: '- ' starts an item, other lines continue it
            items = []
            for line in lines:
                if line.lstrip().startswith('- '):
                    items.append(line.lstrip()[2:])
                else:
                    items[-1] += ' ' + line.strip()
            out += [Paragraph(inline(item), styles['bullet'], bulletText='•') for item in items]
        elif block.strip():
            out.append(Paragraph(inline(' '.join(line.strip() for line in lines)), styles['body']))
    return out


def image_flowable(path, max_width, max_height):
    """A figure at its saved size (or smaller, to fit).

    reportlab stores a PNG as deflated raw pixels, without PNG's row filters: image grids of real photographs (and
    the 2.2c sweep's noise) take hundreds of KB each. So a figure shrunk to fit is first resampled to at most
    EMBED_DPI at its printed size (so that the PDF carries no pixels far finer than it prints), then
    embedded as JPEG (quality 90) when that is under half the lossless size; line plots, where JPEG would be
    larger or smear text, stay lossless."""
    from PIL import Image as PILImage
    from reportlab.platypus import Image
    with PILImage.open(path) as img:
        rgb = img.convert('RGB')
    w, h = rgb.size
    w_pt, h_pt = w * 72 / 110, h * 72 / 110      # the figures are saved at 110 dpi
    scale = min(1.0, max_width / w_pt, max_height / h_pt)
    shrink = EMBED_DPI * scale / 110            # pixels kept per saved pixel
    if shrink < 1:
        rgb = rgb.resize((max(1, round(w * shrink)), max(1, round(h * shrink))), PILImage.LANCZOS)
    lossless = io.BytesIO()
    rgb.save(lossless, 'PNG')
    jpeg = io.BytesIO()
    rgb.save(jpeg, 'JPEG', quality=90)
    source = jpeg if jpeg.tell() < len(zlib.compress(rgb.tobytes())) / 2 else lossless
    source.seek(0)
    return Image(source, width=w_pt * scale, height=h_pt * scale)


def provenance_text(path, summary):
    run = summary.get('run', {})
    parts = [f'run folder {path}']
    if run.get('command'):
        parts.append(f'command: {run["command"]}')
    if run.get('device_name') or summary['metrics'].get('device'):
        parts.append(f'device: {run.get("device_name") or summary["metrics"].get("device")}')
    if run.get('git_commit'):
        parts.append(f'code: {str(run["git_commit"])[:12]}')
    if run.get('started'):
        parts.append(f'started {run["started"]}')
    return '; '.join(parts)


def scale_text(key, summary):
    """At which scale a run was made (epochs, training images, device), read from its summary, and the command of
    the full-size GPU run: each problem's section states both."""
    metrics = summary['metrics']
    if key in ('simsiam', 'ddpm-compare', 'ddpm-recipes'):   # one entry per configuration, T or recipe: the
        # baseline's (T=1000's, or the first run's) scale
        entries = [v for v in metrics.values() if isinstance(v, dict)]
        metrics = metrics.get('baseline') or metrics.get('T1000') or (entries[0] if entries else {})
    parts = []
    if 'epochs' in metrics:
        parts.append(f'{metrics["epochs"]} epochs')
    if 'num_train' in metrics:
        parts.append(f'{metrics["num_train"]:,} training images')
    if metrics.get('arch'):
        parts.append(f'encoder {metrics["arch"]}')
    if metrics.get('device'):
        parts.append(metrics['device'])
    scale = ', '.join(parts) if parts else 'the runs listed in its table'
    return f'Scale of this run: {scale}. The full-size GPU run: `{HOW_TO_RUN[key]}`.'


def figure_block(qid, path, summary, styles, frame_width, max_height):
    """The question's figures, small ones two to a row, each captioned with its id and the run's provenance."""
    from reportlab.platypus import KeepTogether, Paragraph
    files = summary['figures'].get(qid, [])
    where = provenance_text(path, summary)
    out, row = [], []
    for i, name in enumerate(files, 1):
        file = os.path.join(path, name)
        label = f'Figure {qid}' + (f' ({i} of {len(files)})' if len(files) > 1 else '') + f': {name}'
        if not os.path.exists(file):
            out.append(Paragraph(inline(f'{MISSING}{label} is listed in {path}/summary.json but missing{MISSING}'),
                                 styles['body']))
            continue
        small = len(files) > 2 and image_flowable(file, 1e9, 1e9).drawWidth < 0.8 * frame_width
        if small:
            row.append([image_flowable(file, frame_width / 2 - 8, max_height / 2),
                        Paragraph(inline(label), styles['caption'])])
            if len(row) == 2:
                out.append(_pair(row, frame_width))
                row = []
        else:
            out.append(KeepTogether([image_flowable(file, frame_width, max_height),
                                     Paragraph(inline(label), styles['caption'])]))
    if row:
        out.append(_pair(row, frame_width))
    if files:
        out.append(Paragraph(inline(f'All figures of {qid}: {where}.'), styles['caption']))
    return out


def _pair(cells, frame_width):
    from reportlab.platypus import Table, TableStyle
    table = Table([cells], colWidths=[frame_width / 2] * 2)
    table.setStyle(TableStyle([('VALIGN', (0, 0), (-1, -1), 'TOP'), ('ALIGN', (0, 0), (-1, -1), 'CENTER')]))
    return table


def metric_tables(metrics, styles, frame_width):
    """Every metric of a summary: scalars as name/value rows, parallel lists as columns, and dicts as matrices
    (SimSiam configurations or T values as columns; a dict of dicts, like the probe's accuracies, as its own)."""
    from reportlab.platypus import Paragraph
    out = []
    scalars = [[k, format_value(v)] for k, v in metrics.items() if not isinstance(v, (dict, list))]
    if scalars:
        out.append(_table([['metric', 'value']] + scalars, styles, frame_width, [0.4, 0.6]))
    lists = {k: v for k, v in metrics.items() if isinstance(v, list)}
    if lists:
        n = max(len(v) for v in lists.values())
        rows = [[format_value(v[i]) if i < len(v) else '' for v in lists.values()] for i in range(n)]
        out.append(_table([list(lists)] + rows, styles, frame_width))
    flat = {k: v for k, v in metrics.items() if isinstance(v, dict) and not any(isinstance(x, dict)
                                                                                 for x in v.values())}
    if flat:
        out.append(_matrix(flat, styles, frame_width))
    for name, value in metrics.items():
        if isinstance(value, dict) and name not in flat:
            out.append(Paragraph(inline(f'**{name}**'), styles['cell']))
            out.append(_matrix({k: v for k, v in value.items() if isinstance(v, dict)}, styles, frame_width))
    return out


def _matrix(columns, styles, frame_width):
    rows = list(dict.fromkeys(k for column in columns.values() for k in column))
    table = [[''] + list(columns)] + [[r] + [format_value(c[r]) if r in c else '' for c in columns.values()]
                                      for r in rows]
    return _table(table, styles, frame_width)


def _table(rows, styles, frame_width, fractions=None):
    from reportlab.lib.colors import HexColor
    from reportlab.platypus import Paragraph, Table, TableStyle
    cols = len(rows[0])
    fractions = fractions or [1 / cols] * cols
    cells = [[Paragraph(inline(str(c)), styles['cell']) for c in row] for row in rows]
    table = Table(cells, colWidths=[frame_width * f for f in fractions], repeatRows=1, hAlign='LEFT')
    table.setStyle(TableStyle([
        ('BACKGROUND', (0, 0), (-1, 0), HexColor('#e4e9f2')),
        ('GRID', (0, 0), (-1, -1), 0.3, HexColor('#999999')),
        ('VALIGN', (0, 0), (-1, -1), 'TOP'),
        ('TOPPADDING', (0, 0), (-1, -1), 1.5), ('BOTTOMPADDING', (0, 0), (-1, -1), 1.5),
    ]))
    return table


def heading(text, style, level, styles):
    """A heading paragraph that the document turns into a PDF bookmark at `level`."""
    from reportlab.platypus import Paragraph
    p = Paragraph(inline(text), styles[style])
    p.outline_level, p.outline_title = level, text
    return p


def front_matter(runs, styles):
    """The title, then one line per run read (and per run still missing, with the command that makes it)."""
    from reportlab.platypus import Paragraph
    story = [Paragraph('Generative and self-supervised models: the study', styles['title']),
             Paragraph(inline(f'Built {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by '
                              f'`python make_report.py` from these runs (their summary.json files):'), styles['body'])]
    for key, (path, summary) in runs.items():
        story.append(Paragraph(inline(f'**{key}**: {provenance_text(path, summary)}'), styles['bullet'],
                               bulletText='•'))
    for key in (k for k in HOW_TO_RUN if k not in runs):
        story.append(Paragraph(inline(f'**{key}**: {MISSING}not run yet: {HOW_TO_RUN[key]}{MISSING}'),
                               styles['bullet'], bulletText='•'))
    story.append(Paragraph(inline('Numbers in the answers come from these summaries through placeholders, so they '
                                  'always match the runs; red bracketed text marks a run or a number that does not '
                                  'exist yet, with the command that makes it.'), styles['body']))
    return story


def measured_block(key, runs, styles, frame_width):
    """A problem's run: where it comes from, at what scale, and its metric tables."""
    from reportlab.platypus import Paragraph, Spacer
    path, summary = runs[key]
    return [Paragraph(inline(f'Measured: {RUN_TITLES[key]}'), styles['h3']),
            Paragraph(inline(provenance_text(path, summary)), styles['caption']),
            Paragraph(inline(scale_text(key, summary)), styles['caption']),
            *metric_tables(summary['metrics'], styles, frame_width), Spacer(1, 6)]


def question_block(qid, answers, runs, styles, frame_width, max_height):
    """A question: its heading, its figures (or what is missing and the command that makes them), its answer."""
    from reportlab.platypus import KeepTogether, Paragraph
    title_text, body = answers.get(qid, ('', ''))
    block = [heading(f'{qid} {title_text}'.strip(), 'h2', 1, styles)]
    source = FIGURE_SOURCE.get(qid)
    if source is not None:
        if source not in runs:
            block.append(Paragraph(inline(f'{MISSING}Figures of {qid}: not run yet: {HOW_TO_RUN[source]}'
                                          f'{MISSING}'), styles['body']))
        elif qid not in runs[source][1]['figures']:
            block.append(Paragraph(inline(f'{MISSING}Figures of {qid}: not in {runs[source][0]}; make them '
                                          f'with {HOW_TO_RUN[source]}{MISSING}'), styles['body']))
        else:
            block += figure_block(qid, *runs[source], styles, frame_width, max_height)
    if body:
        block += markdown(fill(body, runs), styles)
    else:
        block.append(Paragraph(inline(f'{MISSING}no written answer for {qid} in report/answers.md{MISSING}'),
                               styles['body']))
    return [KeepTogether(block[:2])] + block[2:]   # a heading never ends a page alone


def render_pdf(story, out_path):
    """Lay the story out on A4 with page footers and bookmarks; write it atomically. Returns the page count."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import cm
    from reportlab.platypus import SimpleDocTemplate
    page_w, _ = A4

    class Doc(SimpleDocTemplate):
        """Headings become PDF bookmarks, so a reader can jump to any question id."""

        def afterFlowable(self, flowable):
            level = getattr(flowable, 'outline_level', None)
            if level is not None:
                key = f'h{id(flowable)}'
                self.canv.bookmarkPage(key)
                self.canv.addOutlineEntry(flowable.outline_title, key, level=level, closed=False)

    def footer(canvas, doc):
        canvas.saveState()
        canvas.setFont('DejaVu', 7.5)
        canvas.drawRightString(page_w - 2 * cm, 1.2 * cm, f'page {doc.page}')
        canvas.drawString(2 * cm, 1.2 * cm, 'VAE, DDPM and SimSiam study report')
        canvas.restoreState()

    pdf = io.BytesIO()   # built in memory, then written in one go: a failure never leaves half a report
    doc = Doc(pdf, pagesize=A4, leftMargin=2 * cm, rightMargin=2 * cm, topMargin=1.8 * cm, bottomMargin=1.8 * cm,
              title='VAE, DDPM and SimSiam study report', author='make_report.py')
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_atomically(out_path, pdf.getvalue(), fix='free space or choose another --out')
    return doc.page


def build(runs, answers_text, out_path):
    """Write the PDF (atomically: the previous one is kept if writing fails); returns the number of pages."""
    from reportlab import rl_config
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import cm
    from reportlab.platypus import PageBreak
    rl_config.useA85 = 0   # binary image streams: ASCII85 text encoding would add a quarter to every figure
    fonts()
    styles = make_styles()
    answers, references = parse_answers(answers_text)
    page_w, page_h = A4
    frame_width, max_height = page_w - 4 * cm, page_h * 0.42

    story = front_matter(runs, styles)
    for title, keys, qids in PROBLEMS:
        story += [PageBreak(), heading(title, 'h1', 0, styles)]
        for key in (k for k in keys if k in runs):
            story += measured_block(key, runs, styles, frame_width)
        for qid in qids:
            story += question_block(qid, answers, runs, styles, frame_width, max_height)
    if references:
        story += [PageBreak(), heading('References', 'h1', 0, styles)] + markdown(references, styles)
    return render_pdf(story, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    parser.add_argument('runs', nargs='*', metavar='RUN_DIR',
                        help='finished run folders (each with summary.json); missing ones are marked in the report')
    parser.add_argument('--out', default='report.pdf', help='the PDF to write')
    parser.add_argument('--answers', default=DEFAULT_ANSWERS, help='the written answers (markdown with placeholders)')
    args = parser.parse_args(argv)
    with user_errors():
        check_out(args.out)
        runs = read_runs(args.runs)
        try:
            with open(args.answers, encoding='utf-8') as f:
                answers = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'
            raise UserError(f'cannot read the answers {args.answers} ({why}): pass a markdown file with '
                            f'--answers') from exc
        check_figures(runs)
        pages = build(runs, answers, args.out)
        print(f'{args.out}: {pages} pages from {len(runs)} runs ({", ".join(runs) or "none"})')
        return pages


if __name__ == '__main__':
    main(sys.argv[1:])
