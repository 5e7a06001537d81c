"""Build the study's report.pdf from finished run folders: every figure, metric table and written answer.

    python make_report.py plots/vae plots/ddpm plots/ddpm-recipes plots/ddpm-compare plots/ddpm-probe plots/simsiam \
        simsiam-questions=plots/simsiam-questions vae-wall=plots/vae-wall --out plots/report.pdf

Reads only each run folder's summary.json (docs/operations.md, "The run folder"), the written answers in
report/answers.md and the meaning of each metric key in report/keys.md. An answer cites measured numbers through
placeholders, {{RUN.KEY.SUBKEY:FORMAT}}: RUN is a summary's "model" (vae, ddpm, ddpm-recipes, ddpm-compare,
ddpm-probe, simsiam) or the key it was given (simsiam-questions=FOLDER), the dotted keys walk its "metrics" (a
number picks a list's entry) and FORMAT is an optional Python format spec; a derived number is computed,
{{= $RUN.KEY - $RUN.KEY2 :.1f}}. So the text never drifts from the runs, and the build refuses a literal number that
no run backs (outside a sentence that cites a paper). A run that was not given shows as "not run yet: <command>"
wherever it is needed; the report is still built.

Page 1 holds the verdicts (the answers' Summary section) and the assignment's settings against the runs'
(Settings); then one section per problem, each question with its captioned figures and its answer; the references;
Appendix A, every metric of every run with its command, device and commit (each SimSiam configuration's own); and
Appendix B, what each metric key means. Pages under a third full that end no section are reported as a warning.

Every user error is one line (exit status 2) before the slow work: an --out that cannot be written (empty, a folder,
below a file, a forbidden or read-only place, an existing file that is not a PDF), a summary.json that is not a
run summary (naming the file and the key), a figure that a summary lists but that is missing, truncated or not an
image. The PDF is written through a temp file and os.replace: a failure leaves the previous report intact.
"""
import argparse
import ast
import fnmatch
import html
import math
import io
import os
import re
import sys
import time
import zlib
from typing import NamedTuple

from studylib import UserError
from studylib.run import HelpFormatter, read_summary, user_errors, write_atomically

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ANSWERS = os.path.join(ROOT, 'report', 'answers.md')
KEYS = os.path.join(ROOT, 'report', 'keys.md')

PROBLEMS = [
    ('Problem 1: a variational autoencoder on SVHN', ['vae', 'vae-wall'],
     ['1.3a', '1.3b', '1.3c', '1.3d', '1.3e', '1.3f']),
    ('Problem 2: a denoising diffusion model on SVHN', ['ddpm', 'ddpm-recipes', 'ddpm-compare', 'ddpm-probe'],
     ['2.2a', '2.2b', '2.2c', '2.2d', '2.2e', '2.3a', '2.3b']),
    ('Problem 3: SimSiam on CIFAR-10', ['simsiam', 'simsiam-questions'],
     ['3.4', '3.5a', '3.5b', '3.5c', '3.6', '3.7', '3.8', '3.9']),
]
QUESTION_IDS = [qid for _, _, ids in PROBLEMS for qid in ids]
# The runs whose figures answer each question, the first one given wins (the written questions' study draws 3.4 and
# 3.5a with the effective rank and spectrum, and reproduces the ablation study's rows exactly).
FIGURE_SOURCE = {**{q: ('vae',) for q in QUESTION_IDS if q.startswith('1.')},
                 **{q: ('ddpm',) for q in ('2.2a', '2.2b', '2.2c', '2.2d')},
                 '2.2e': ('ddpm-recipes',), '2.3a': ('ddpm-compare',), '2.3b': ('ddpm-probe',),
                 '3.4': ('simsiam-questions', 'simsiam'), '3.5a': ('simsiam-questions', 'simsiam'),
                 '3.5b': ('simsiam',),
                 **{q: ('simsiam-questions',) for q in ('3.5c', '3.6', '3.7', '3.8', '3.9')}}
# A run given as KEY=FOLDER: the key its placeholders use, and the model its summary must be.
RUN_MODEL = {'simsiam-questions': 'simsiam', 'vae-wall': 'vae'}
HOW_TO_RUN = {
    'vae': 'python train_vae.py --out-dir runs/vae',
    'vae-wall': 'python train_vae.py --epochs 310 --out-dir runs/vae-wall (the DDPM\'s training time on a CPU core)',
    'ddpm': 'python train_ddpm.py --compare-vae runs/vae --out-dir runs/ddpm',
    'ddpm-recipes': 'python train_ddpm.py --recipe cpu --sample-every 4 --out-dir runs/ddpm, the same with '
                    '--recipe assignment --sampler ddim --clip-denoised --out-dir runs/ddpm-assignment, then python '
                    'compare_ddpm.py --by recipe runs/ddpm-assignment runs/ddpm --out-dir runs/ddpm-recipes',
    'ddpm-compare': 'python train_ddpm.py --timesteps 500 --out-dir runs/ddpm-T500, the same with --timesteps 1500 '
                    '--out-dir runs/ddpm-T1500, then python compare_ddpm.py runs/ddpm-T500 runs/ddpm '
                    'runs/ddpm-T1500 --out-dir runs/ddpm-compare',
    'ddpm-probe': 'python probe_ddpm.py --ddpm runs/ddpm --vae runs/vae --out-dir runs/ddpm-probe',
    'simsiam': 'python train_simsiam.py --experiment ablations --out-dir runs/simsiam',
    'simsiam-questions': 'python train_simsiam.py --experiment all --out-dir runs/simsiam-questions',
}
RUN_TITLES = {'vae': 'VAE run', 'vae-wall': 'the VAE trained for the DDPM\'s wall time (1.3b, 2.2d)', 'ddpm': 'DDPM run', 'ddpm-recipes': '2.2e: DDPM training recipes at equal wall time',
              'ddpm-compare': '2.3a: DDPM runs against T',
              'ddpm-probe': '2.3b: linear probe of frozen features', 'simsiam': 'SimSiam ablations (3.4, 3.5a, 3.5b)',
              'simsiam-questions': 'SimSiam: the written questions measured (3.5c to 3.9)'}
PLACEHOLDER = re.compile(r'\{\{\s*([A-Za-z0-9_.-]+?)\s*(?::([^}]*))?\}\}')
EMBED_DPI = 90   # the most pixels per inch a figure keeps in the PDF
MISSING = '\x00'   # marks text that reports a missing run or number, rendered in red


# ---------------------------------------------------------------------------------------------- reading the inputs

def read_runs(run_dirs):
    """{key: (run folder, summary)}. A folder's key is its summary's "model", or KEY in KEY=FOLDER (a second run of
    one model, such as simsiam-questions=plots/simsiam-questions); of several DDPM runs the T=1000 one (the seed's)
    answers 2.2."""
    runs = {}
    for arg in run_dirs:
        named, _, path = arg.rpartition('=') if '=' in arg and not os.path.exists(arg) else ('', '', arg)
        if named and named not in RUN_MODEL:
            raise UserError(f'{arg}: unknown run key {named!r}; the keys that name a run are '
                            f'{", ".join(sorted(RUN_MODEL))} (other runs need no key)')
        summary = read_summary(path, hint='pass finished run folders (train_*.py, compare_ddpm.py, probe_ddpm.py)')
        key = named or summary['model']
        if named and summary['model'] != RUN_MODEL[named]:
            raise UserError(f'{arg}: {path} holds a {summary["model"]} run; {named} must be a '
                            f'{RUN_MODEL[named]} run')
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
        source = figure_source(qid, runs)
        if source in runs:
            path, summary = runs[source]
            for name in summary['figures'].get(qid, []):
                yield qid, path, name


def figure_source(qid, runs):
    """The run whose figures answer qid: the first of its FIGURE_SOURCE that was given and drew them (else the first
    given, else the first named: what is missing); None for a written answer."""
    sources = FIGURE_SOURCE.get(qid, ())
    given = [k for k in sources if k in runs]
    drawn = [k for k in given if qid in runs[k][1]['figures']]
    return (drawn or given or list(sources) or [None])[0]


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


class Answer(NamedTuple):
    title: str
    body: str                       # markdown with placeholders, the caption lines taken out
    captions: list                  # [(file name pattern, caption markdown)], in their order


CAPTION = re.compile(r'^Figure (\S+): (.+)$', flags=re.M)


def parse_answers(text):
    """answers.md -> ({question id: Answer}, {section: markdown}). A '## ' heading that starts with a question id
    is an answer; any other (Summary, Settings, References) is a section. In an answer, a line
    'Figure PATTERN: text' captions the figures whose file names match PATTERN (fnmatch; {epoch} in the text is the
    file name's epoch)."""
    answers, sections = {}, {}
    for block in re.split(r'^## ', text, flags=re.M)[1:]:
        heading, _, body = block.partition('\n')
        qid, _, title = heading.strip().partition(' ')
        if qid in QUESTION_IDS:
            captions = CAPTION.findall(body)
            answers[qid] = Answer(title.strip(), CAPTION.sub('', body).strip(), captions)
        else:
            sections[heading.strip()] = body.strip()
    return answers, sections


def caption_of(name, captions):
    """The caption of figure file `name`: the first pattern that matches it, else None."""
    for pattern, text in captions:
        if fnmatch.fnmatchcase(name, pattern):
            epoch = re.search(r'epoch0*(\d+)', name)
            return text.replace('{epoch}', epoch.group(1) if epoch else '?')
    return None


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
    value = _root(runs[key][1], keys)
    for k in keys[1:] if value is not runs[key][1]['metrics'] else keys:
        if isinstance(value, list) and k.isdigit() and int(k) < len(value):   # a list's entry by its index
            value = value[int(k)]
            continue
        if not isinstance(value, dict) or k not in value:
            if RUN_MODEL.get(key, key) == 'simsiam' and value is runs[key][1]['metrics']:   # a configuration the
                # experiment lacks
                if told is not None and f'{key}.{k}' in told:
                    return MISSING + 'not run yet' + MISSING
                if told is not None:
                    told.add(f'{key}.{k}')
                return MISSING + f'not run yet: configuration {k} ({HOW_TO_RUN[key]})' + MISSING
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


def alphabar(t, timesteps=1000):
    """ᾱ_t of the template's schedule (linear betas from 1e-4 to 0.02 over T steps), t a 0-based step."""
    product = 1.0
    for s in range(int(t) + 1):
        product *= 1 - (1e-4 + (0.02 - 1e-4) * s / (timesteps - 1))
    return product


CALC_FUNCTIONS = {'sqrt': math.sqrt, 'log': math.log, 'log2': math.log2, 'log10': math.log10, 'exp': math.exp,
                  'abs': abs, 'min': min, 'max': max, 'alphabar': alphabar,
                  'snr': lambda t, timesteps=1000: alphabar(t, timesteps) / (1 - alphabar(t, timesteps))}
CALC = re.compile(r'\{\{=\s*(.+?)\s*(?::([^:}]*))?\}\}')
CALC_REF = re.compile(r'\$([A-Za-z0-9_.-]*[A-Za-z0-9_])')


def calculate(expression, runs):
    """A number derived in the text, {{= EXPR :FORMAT}}: EXPR is arithmetic (+ - * / **, CALC_FUNCTIONS) on numbers
    and on $RUN.KEY... references to the summaries (a minus between two references needs spaces), so that a
    difference, a ratio or a schedule value is computed, never typed. Returns the value, or a MISSING note."""
    values, missing = {}, []

    def reference(match):
        text = lookup(runs, match.group(1), None)
        value = _number_at(runs, match.group(1))
        if value is None:
            missing.append(text if MISSING in text else f'{MISSING}not a number: {match.group(1)}{MISSING}')
            return '0'
        name = f'_v{len(values)}'
        values[name] = value
        return name

    source = CALC_REF.sub(reference, expression)
    if missing:
        return missing[0]

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.Name) and node.id == 'pi':
            return math.pi
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -evaluate(node.operand) if isinstance(node.op, ast.USub) else evaluate(node.operand)
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CALC_FUNCTIONS \
                and not node.keywords:
            return CALC_FUNCTIONS[node.func.id](*[evaluate(a) for a in node.args])
        raise ValueError(ast.dump(node)[:60])

    try:
        return evaluate(ast.parse(source, mode='eval'))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
        return f'{MISSING}cannot compute {{{{= {expression}}}}}: {type(exc).__name__}{MISSING}'


def _root(summary, keys):
    """Where a placeholder's keys start: the summary's metrics, or, for RUN.args.NAME (when the metrics hold no
    'args'), the arguments the run was started with."""
    if keys and keys[0] == 'args' and 'args' not in summary['metrics']:
        return summary.get('run', {}).get('args', {})
    return summary['metrics']


def _number_at(runs, path):
    """The number a placeholder path names, or None."""
    key, *keys = path.split('.')
    if key not in runs:
        return None
    value = _root(runs[key][1], keys)
    for k in keys[1:] if value is not runs[key][1]['metrics'] else keys:
        if isinstance(value, list) and k.isdigit() and int(k) < len(value):
            value = value[int(k)]
        elif isinstance(value, dict) and k in value:
            value = value[k]
        else:
            return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fill(text, runs):
    told = set()

    def calc(match):
        value = calculate(match.group(1), runs)
        return value if isinstance(value, str) else format_value(value, match.group(2))

    text = CALC.sub(calc, text)
    return PLACEHOLDER.sub(lambda m: lookup(runs, m.group(1), m.group(2), told), text)


# A literal number in the answers must be one that a run backs. Exempt: a number inside a sentence that cites a
# paper (its numbers are the paper's) or that starts "For example" (a worked example, no claim about a run), inside
# `code`, part of a word (ResNet-18, bf16, x₀), a question id, a paper's section, figure, table or equation number,
# and the counting numbers up to 10.
LITERAL = re.compile(r'(?<![\w.\-/^·⁻])(\d+(?:,\d{3})*(?:\.\d+)?)(?![\w.]*\d)(?![A-Za-z_])')
CITATION = re.compile(r'[A-Z][\w\-]+(?: et al| & [A-Z][\w\-]+)?,? \(?(?:19|20)\d\d|arXiv')
EXEMPT_CONTEXT = re.compile(r'(?:Sec|Secs|Fig|Figs|Table|Tables|Appendix|Eq|Problem) $')


def literal_numbers(text):
    """(number text, sentence) of every literal number in answer text that is not exempt (above)."""
    text = re.sub(r'`[^`]*`', ' ', CALC.sub(' ', PLACEHOLDER.sub(' ', text)))
    ids = '|'.join(re.escape(q) for q in sorted(QUESTION_IDS, key=len, reverse=True))
    text = re.sub(r'(?<![\d.,])(?:' + ids + r')(?![\d])', ' ', text)
    found = []
    text = re.sub(r'\b(et al|e\.g|i\.e|Sec|Secs|Fig|Figs|Eq|cf|vs)\.', r'\1', text)   # no sentence ends there
    for sentence in re.split(r'(?<=[.!?])\s+(?=[A-Z*])|\n\s*\n|\n\s*[-|]', text):
        if CITATION.search(sentence) or sentence.lstrip('*- ').startswith('For example'):
            continue
        for match in LITERAL.finditer(sentence):
            number = match.group(1)
            before = sentence[:match.start()]
            value = float(number.replace(',', ''))
            if (value <= 10 and number.isdigit()) or EXEMPT_CONTEXT.search(before[-12:]):
                continue
            found.append((number, ' '.join(sentence.split())[:160]))
    return found


def backed_values(runs):
    """Every number of every given summary (metrics and the run's arguments), for literal_numbers' check."""
    values = []

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            values.append(float(node))
        if isinstance(node, dict):   # the runs' own labels: T1500, dim4096, barlow-2048
            values.extend(float(n) for key in node for n in re.findall(r'\d+', str(key)))

    for _, summary in runs.values():
        walk(summary['metrics'])
        walk(summary.get('run', {}).get('args', {}))
    return values


def unbacked_numbers(text, runs):
    """The literal numbers of `text` that no given run backs: a number is backed when some summary value (or 100
    times it, a share in percent) rounds to it at the number's own precision."""
    values = backed_values(runs)
    out = []
    for number, sentence in literal_numbers(text):
        digits = len(number.partition('.')[2])
        target = float(number.replace(',', ''))
        tolerance = 0.5 * 10 ** -digits + 1e-9
        if not any(abs(v - target) <= tolerance or abs(100 * v - target) <= tolerance for v in values):
            out.append((number, sentence))
    return out


def runs_named(text):
    """The run keys that text's placeholders and derived numbers read."""
    return ({m.group(1).split('.')[0] for m in PLACEHOLDER.finditer(text)}
            | {ref.split('.')[0] for m in CALC.finditer(text) for ref in CALC_REF.findall(m.group(1))})


def unbacked_in_answers(answers_text, runs):
    """unbacked_numbers of each answer and section (not the references) whose runs were all given, against the runs
    it names (an answer that names none, against all of them)."""
    answers, sections = parse_answers(answers_text)
    texts = [a.body + '\n\n' + '\n\n'.join(c for _, c in a.captions) for a in answers.values()]
    texts += [body for name, body in sections.items() if name not in ('References', 'Settings')]
    if 'Settings' in sections:   # its second column states the course template's settings, not a run's
        texts.append(re.sub(r'^(\|[^|\n]*\|)[^|\n]*\|', r'\1 |', sections['Settings'], flags=re.M))
    out = []
    for text in texts:   # backed by the runs the text itself names (all of them when it names none)
        named = runs_named(text)
        if runs and named <= set(runs):
            out += unbacked_numbers(text, {k: runs[k] for k in named} or runs)
    return out


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


def markdown(text, styles, frame_width=None):
    """The answers' markdown: paragraphs, '- ' lists and '|' tables (the first row is the header, the second the
    |---| rule)."""
    from reportlab.platypus import Paragraph, Spacer
    out = []
    for block in re.split(r'\n\s*\n', text.strip()):
        lines = block.split('\n')
        if lines[0].lstrip().startswith('|') and frame_width:
            rows = [[cell.strip() for cell in line.strip().strip('|').split('|')] for line in lines
                    if line.strip() and not re.fullmatch(r'[\s|:\-]+', line)]
            out += [_table(rows, styles, frame_width, _fractions(rows)), Spacer(1, 6)]
        elif lines[0].lstrip().startswith('- '):   # a list: '- ' starts an item, other lines continue it
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


def _fractions(rows):
    """Column widths of a table in proportion to the square root of its longest cell (at least 6 % each)."""
    longest = [max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(len(rows[0]))]
    weights = [max(math.sqrt(max(n, 1)), 0.06 * sum(math.sqrt(max(m, 1)) for m in longest)) for n in longest]
    return [w / sum(weights) for w in weights]


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
    source = jpeg if jpeg.tell() < len(zlib.compress(rgb.tobytes())) * 0.8 else lossless
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
        parts.append(f'code: {run["git_commit"]}')   # whole, with "-dirty" when the tree had changes
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


def figure_block(qid, path, summary, styles, frame_width, max_height, *, captions):
    """The question's figures, small ones two to a row, each with its caption from the answer (a figure without
    one is named in red) and, once, the run's provenance."""
    from reportlab.platypus import KeepTogether, Paragraph
    files = summary['figures'].get(qid, [])
    where = provenance_text(path, summary)
    out, row = [], []
    for i, name in enumerate(files, 1):
        file = os.path.join(path, name)
        caption = caption_of(name, captions)
        caption = caption[:1].upper() + caption[1:] if caption else caption
        label = f'**Figure {qid}' + (f' ({i} of {len(files)})' if len(files) > 1 else '') + '.** ' + (
            caption if caption else f'{MISSING}no caption for {name} in report/answers.md{MISSING}')
        if not os.path.exists(file):
            out.append(Paragraph(inline(f'{MISSING}{name} is listed in {path}/summary.json but missing{MISSING}'),
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
        out.append(Paragraph(inline(f'The figures of {qid} come from {where}.'), styles['caption']))
    return out


def _pair(cells, frame_width):
    from reportlab.platypus import Table, TableStyle
    table = Table([cells], colWidths=[frame_width / 2] * 2)
    table.setStyle(TableStyle([('VALIGN', (0, 0), (-1, -1), 'TOP'), ('ALIGN', (0, 0), (-1, -1), 'CENTER')]))
    return table


MATRIX_COLUMNS = 6   # configurations (or T values) per table in the appendix: more would not fit A4's width


def metric_tables(metrics, styles, frame_width):
    """Every metric of a summary: scalars as name/value rows, parallel lists as columns, and dicts as matrices
    (SimSiam configurations or T values as columns, at most MATRIX_COLUMNS to a table; a dict of dicts, like the
    probe's accuracies, as its own). Commits are listed by provenance_text, not here."""
    from reportlab.platypus import Paragraph
    out = []
    scalars = [[f'`{k}`', format_value(v)] for k, v in metrics.items() if not isinstance(v, (dict, list))]
    if scalars:
        out.append(_table([['metric', 'value']] + scalars, styles, frame_width, [0.4, 0.6]))
    lists = {k: v for k, v in metrics.items() if isinstance(v, list)}
    if lists:
        n = max(len(v) for v in lists.values())
        rows = [[format_value(v[i]) if i < len(v) else '' for v in lists.values()] for i in range(n)]
        out.append(_table([[f'`{k}`' for k in lists]] + rows, styles, frame_width))
    flat = {k: {r: x for r, x in v.items() if r != 'git_commit'} for k, v in metrics.items()
            if isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values())}
    names = list(flat)
    for start in range(0, len(names), MATRIX_COLUMNS):
        out.append(_matrix({k: flat[k] for k in names[start:start + MATRIX_COLUMNS]}, styles, frame_width))
    for name, value in metrics.items():
        if isinstance(value, dict) and name not in flat:
            out.append(Paragraph(inline(f'`{name}`'), styles['cell']))
            out.append(_matrix({k: v for k, v in value.items() if isinstance(v, dict)}, styles, frame_width))
    return out


def metric_keys(metrics):
    """Every key metric_tables prints for a summary's metrics (the rows and columns a reader must have explained)."""
    keys = []
    for k, v in metrics.items():
        if isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values()):
            keys += [r for r in v if r != 'git_commit']
        elif isinstance(v, dict):
            keys += [r for column in v.values() if isinstance(column, dict) for r in column]
        else:
            keys.append(k)
    return list(dict.fromkeys(keys))


def _matrix(columns, styles, frame_width):
    rows = list(dict.fromkeys(k for column in columns.values() for k in column))
    table = [[''] + list(columns)] + [[f'`{r}`'] + [format_value(c[r]) if r in c else '' for c in columns.values()]
                                      for r in rows]
    return _table(table, styles, frame_width, [0.28] + [0.72 / len(columns)] * len(columns))


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


def front_matter(runs, sections, styles, frame_width):
    """Page 1: the title, the verdict of every question with its number (the Summary section of answers.md), the
    assignment's settings against what was run (Settings), and the runs read."""
    from reportlab.platypus import Paragraph
    story = [Paragraph('Generative and self-supervised models: the study', styles['title']),
             Paragraph(inline(f'Built {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by '
                              f'`python make_report.py` from the runs listed in Appendix A; every number comes '
                              f'from their summary.json files.'), styles['body'])]
    for name in ('Summary', 'Settings'):
        if name in sections:
            story += [heading(name, 'h2', 0, styles)] + markdown(fill(sections[name], runs), styles, frame_width)
    missing = [k for k in HOW_TO_RUN if k not in runs]
    if missing:
        story.append(Paragraph(inline(f'{MISSING}Not run yet: ' + '; '.join(f'{k} ({HOW_TO_RUN[k]})' for k in missing)
                                      + MISSING), styles['body']))
    return story


def configuration_commits(summary):
    """'name: commit' of each configuration of a multi-configuration run that records its own commit."""
    return [f'{name}: {entry["git_commit"]}' for name, entry in summary['metrics'].items()
            if isinstance(entry, dict) and entry.get('git_commit')]


def measured_block(key, runs, styles, frame_width):
    """Appendix A's entry of a run: where it comes from, at what scale, the commit of each configuration, and its
    metric tables."""
    from reportlab.platypus import Paragraph, Spacer
    path, summary = runs[key]
    commits = configuration_commits(summary)
    return [heading(f'{key}: {RUN_TITLES[key]}', 'h2', 1, styles),
            Paragraph(inline(provenance_text(path, summary)), styles['caption']),
            Paragraph(inline(scale_text(key, summary)), styles['caption']),
            *([Paragraph(inline('Code of each configuration: ' + '; '.join(commits)), styles['caption'])]
              if commits else []),
            *metric_tables(summary['metrics'], styles, frame_width), Spacer(1, 6)]


def read_keys(text):
    """report/keys.md -> {metric key: what it means}: a '- `key`: meaning' item each (indented lines continue it)."""
    text = re.sub(r'\n[ \t]+', ' ', text)
    return dict(re.findall(r'^- `([^`]+)`: (.+)$', text, flags=re.M))


def keys_block(runs, keys, styles, frame_width):
    """Appendix B: what every key printed in Appendix A means (a key without an explanation is named in red)."""
    printed = list(dict.fromkeys(k for _, summary in runs.values() for k in metric_keys(summary['metrics'])))
    rows = [['key', 'meaning']] + [[f'`{k}`', keys.get(k, f'{MISSING}not explained in report/keys.md{MISSING}')]
                                   for k in sorted(printed)]
    return [_table(rows, styles, frame_width, [0.3, 0.7])]


def question_block(qid, answers, runs, styles, frame_width, max_height, *, lead=()):
    """A question: its heading, its figures (or what is missing and the command that makes them), its answer
    (whose own tables stand in it). `lead` (a problem's heading) is kept on the page of the question's start."""
    from reportlab.platypus import KeepTogether, Paragraph
    answer = answers.get(qid, Answer('', '', []))
    block = [*lead, heading(f'{qid} {answer.title}'.strip(), 'h2', 1, styles)]
    source = figure_source(qid, runs)
    if source is not None:
        if source not in runs:
            block.append(Paragraph(inline(f'{MISSING}Figures of {qid}: not run yet: {HOW_TO_RUN[source]}'
                                          f'{MISSING}'), styles['body']))
        elif qid not in runs[source][1]['figures']:
            block.append(Paragraph(inline(f'{MISSING}Figures of {qid}: not in {runs[source][0]}; make them '
                                          f'with {HOW_TO_RUN[source]}{MISSING}'), styles['body']))
        else:
            block += figure_block(qid, *runs[source], styles, frame_width, max_height,
                                  captions=[(p, fill(c, runs)) for p, c in answer.captions])
    if answer.body:
        block += markdown(fill(answer.body, runs), styles, frame_width)
    else:
        block.append(Paragraph(inline(f'{MISSING}no written answer for {qid} in report/answers.md{MISSING}'),
                               styles['body']))
    keep = len(lead) + 2
    head = [f for item in block[:keep] for f in (item._content if isinstance(item, KeepTogether) else [item])]
    return [KeepTogether(head)] + block[keep:]   # a heading never ends a page alone (nor nests a KeepTogether)


class Layout(NamedTuple):
    pages: int
    sparse: list       # pages under a third full that do not end a section (the page after starts none)


SPARSE = 1 / 3   # a page filled less than this, when no section ends on it, is a layout defect


def render_pdf(story, out_path):
    """Lay the story out on A4 with page footers and bookmarks; write it atomically. Returns the Layout: the page
    count and the sparse pages."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import cm
    from reportlab.platypus import SimpleDocTemplate
    page_w, _ = A4
    lowest, opens_section = {}, {}   # page -> the lowest y drawn on it; page -> whether it starts a section

    class Doc(SimpleDocTemplate):
        """Headings become PDF bookmarks, so a reader can jump to any question id; and each page's fill is noted."""

        def afterFlowable(self, flowable):
            level = getattr(flowable, 'outline_level', None)
            if level is not None:
                key = f'h{id(flowable)}'
                self.canv.bookmarkPage(key)
                self.canv.addOutlineEntry(flowable.outline_title, key, level=level, closed=False)
            name = type(flowable).__name__
            if self.frame is None or name in ('PageBreak', 'Spacer') or name.startswith('_') \
                    or name.endswith('ActionFlowable'):   # breaks and layout actions draw nothing
                return
            opens_section.setdefault(self.page, level == 0)
            lowest[self.page] = min(lowest.get(self.page, self.frame._y), self.frame._y)

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
    top, height = doc.bottomMargin + doc.height, doc.height
    sparse = [p for p in range(1, doc.page) if (top - lowest.get(p, top)) / height < SPARSE
              and not opens_section.get(p + 1, False)]
    return Layout(doc.page, sparse)


def build(runs, answers_text, keys_text, out_path, answers_name='report/answers.md'):
    """Write the PDF (atomically: the previous one is kept if writing fails); returns its Layout. Given every run,
    refuses before the slow work an answer that states a number no run backs (unbacked_in_answers)."""
    from reportlab import rl_config
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import cm
    from reportlab.platypus import PageBreak
    unbacked = unbacked_in_answers(answers_text, runs)
    if unbacked:
        number, sentence = unbacked[0]
        problem = (f'{answers_name} states {number} ("{sentence}") and no given run backs it: cite the run with a '
                   f'placeholder ({{{{RUN.KEY}}}}, or {{{{= EXPR}}}} for a derived number), or the paper in the same '
                   f'sentence ({len(unbacked)} such numbers in all)')
        if set(HOW_TO_RUN) <= set(runs):   # the whole report; a draft of some runs cannot check the others' numbers
            raise UserError(problem)
    rl_config.useA85 = 0   # binary image streams: ASCII85 text encoding would add a quarter to every figure
    fonts()
    styles = make_styles()
    answers, sections = parse_answers(answers_text)
    page_w, page_h = A4
    frame_width, max_height = page_w - 4 * cm, page_h * 0.42

    story = front_matter(runs, sections, styles, frame_width)
    for title, keys, qids in PROBLEMS:
        story.append(PageBreak())
        for i, qid in enumerate(qids):
            lead = [heading(title, 'h1', 0, styles)] if i == 0 else []
            story += question_block(qid, answers, runs, styles, frame_width, max_height, lead=lead)
    if 'References' in sections:
        story += [PageBreak(), heading('References', 'h1', 0, styles)] + markdown(sections['References'], styles)
    if runs:
        story += [PageBreak(), heading('Appendix A: every metric of every run', 'h1', 0, styles)]
        for key in (k for _, keys, _ in PROBLEMS for k in keys if k in runs):
            story += measured_block(key, runs, styles, frame_width)
        story += [PageBreak(), heading('Appendix B: what the metric keys mean', 'h1', 0, styles)]
        story += keys_block(runs, read_keys(keys_text), styles, frame_width)
    return render_pdf(story, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    parser.add_argument('runs', nargs='*', metavar='RUN_DIR',
                        help='finished run folders (each with summary.json); missing ones are marked in the report. '
                             'A second run of one model takes a key: simsiam-questions=FOLDER')
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
        keys = open(KEYS, encoding='utf-8').read()
        layout = build(runs, answers, keys, args.out, args.answers)
        print(f'{args.out}: {layout.pages} pages from {len(runs)} runs ({", ".join(runs) or "none"})')
        if layout.sparse:
            print(f'warning: pages {", ".join(map(str, layout.sparse))} are less than a third full and end no '
                  f'section', file=sys.stderr)
        return layout.pages


if __name__ == '__main__':
    main(sys.argv[1:])
