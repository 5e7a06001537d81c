"""make_report.py: placeholders filled from summary.json, missing runs marked, a PDF with every question id."""
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

import make_report
from conftest import ROOT


def _run(folder, model, figures, metrics):
    folder.mkdir(parents=True)
    for names in figures.values():
        for name in names:
            Image.new('RGB', (440, 300), (200, 30, 30)).save(folder / name)
    summary = {'model': model, 'figures': figures, 'metrics': metrics,
               'run': {'command': f'python train_{model}.py', 'device_name': 'cpu (test)'}}
    (folder / 'summary.json').write_text(json.dumps(summary))
    return str(folder)


@pytest.fixture
def two_runs(tmp_path):
    vae = _run(tmp_path / 'vae', 'vae', {'1.3a': ['1.3a_time.png'], '1.3b': [f'1.3b_{i}.png' for i in range(3)]},
               {'epochs': 30, 'test_bits_per_dim': 8.3505836, 'device': 'cpu (test)'})
    simsiam = _run(tmp_path / 'simsiam', 'simsiam', {'3.4': ['3.4_loss.png']},
                   {'baseline': {'final_knn_top1': 28.90625, 'epochs': 3},
                    'no-stop-grad': {'final_knn_top1': 10.0, 'epochs': 3}})
    return [vae, simsiam]


def outline_titles(pdf_bytes):
    """Bookmark titles of a PDF, decoded from its literal strings (PDF escapes; UTF-16 after a BOM)."""
    titles = []
    for raw in re.findall(rb'/Title\s*\(((?:[^()\\]|\\.)*)\)', pdf_bytes, flags=re.S):
        unescaped = re.sub(rb'\\([0-7]{1,3}|.)', lambda m: bytes([int(m.group(1), 8)]) if m.group(1).isdigit()
                           else {b'n': b'\n', b'r': b'\r', b't': b'\t'}.get(m.group(1), m.group(1)), raw)
        titles.append(unescaped[2:].decode('utf-16-be') if unescaped.startswith(b'\xfe\xff')
                      else unescaped.decode('latin-1'))
    return titles


def test_placeholders_take_numbers_from_the_summaries_and_mark_what_is_missing(two_runs):
    runs = make_report.read_runs(two_runs)
    text = ('{{vae.epochs}} epochs, {{vae.test_bits_per_dim:.2f}} bits/dim, kNN '
            '{{simsiam.baseline.final_knn_top1:.1f}}%; {{ddpm.t_star}}; {{vae.nope}}; '
            '{{simsiam.dim4096.final_knn_top1}}; {{ddpm.epochs}}')
    filled = make_report.fill(text, runs)
    parts = filled.split(make_report.MISSING)
    assert parts[0] == '30 epochs, 8.35 bits/dim, kNN 28.9%; '
    assert parts[1] == f'not run yet: {make_report.HOW_TO_RUN["ddpm"]}'
    assert parts[3] == f'not measured in {two_runs[0]}'
    assert parts[5].startswith('not run yet: configuration dim4096')
    assert parts[7] == 'not run yet'   # the command for a missing run is given once per answer


def test_a_number_in_a_placeholder_picks_a_list_entry(tmp_path):
    recipes = _run(tmp_path / 'rec', 'ddpm-recipes', {}, {'ddpm-cpu': {'digit_fd': [433.2, 298.7, 206.8]}})
    runs = make_report.read_runs([recipes])
    filled = make_report.fill('{{ddpm-recipes.ddpm-cpu.digit_fd.1:.0f}} then {{ddpm-recipes.ddpm-cpu.digit_fd.2}}; '
                              '{{ddpm-recipes.ddpm-cpu.digit_fd:.0f}}; {{ddpm-recipes.ddpm-cpu.digit_fd.3}}', runs)
    parts = filled.split(make_report.MISSING)
    assert parts[0] == '299 then 206.8; 433, 299, 207; '
    assert parts[1] == f'not measured in {recipes}'
    assert make_report.format_value([433.16255518336345, 7]) == '433.2, 7'   # a curve in a metrics table


def test_report_has_a_page_per_part_and_every_question_id(two_runs, tmp_path):
    out = tmp_path / 'out' / 'report.pdf'
    pages = make_report.main(two_runs + ['--out', str(out)])
    data = out.read_bytes()
    assert data.startswith(b'%PDF') and data.rstrip().endswith(b'%%EOF')
    assert len(re.findall(rb'/Type\s*/Page[^s]', data)) == pages >= 5   # title + 3 problems + references
    titles = outline_titles(data)
    for qid in make_report.QUESTION_IDS:
        assert sum(t.startswith(qid + ' ') or t == qid for t in titles) == 1, qid
    assert not (tmp_path / 'out' / 'report.pdf.tmp').exists()
    assert b'ASCII85Decode' not in data   # binary streams: ASCII85 would add a quarter to every figure


def test_photographs_are_embedded_as_jpeg_and_plots_stay_lossless(tmp_path):
    """A grid of smooth photographs costs ~4x less as JPEG than as reportlab's deflated pixels, and must come back
    close to the original; a line plot must stay the PNG file itself (JPEG would be larger and smear its text)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(60, 55, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((440, 484), Image.BILINEAR)   # smooth, full-colour, like image grids
    photo.save(tmp_path / 'grid.png')
    plot = Image.new('RGB', (660, 400), 'white')
    ImageDraw.Draw(plot).line([(40, 360), (300, 100), (620, 60)], fill=(31, 119, 180), width=3)
    plot.save(tmp_path / 'plot.png')

    (tmp_path / 'summary.json').write_text(json.dumps({
        'model': 'vae', 'figures': {'1.3a': ['plot.png'], '1.3b': ['grid.png']}, 'metrics': {}}))
    out = tmp_path / 'report.pdf'
    make_report.main([str(tmp_path), '--out', str(out)])
    data = out.read_bytes()
    assert len(re.findall(rb'/Subtype\s*/Image', data)) == 2 and data.count(b'/DCTDecode') == 1
    jpegs = re.findall(rb'\xff\xd8\xff.*?\xff\xd9', data, flags=re.S)   # SOI ... EOI: the one JPEG stream
    assert len(jpegs) == 1
    decoded = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert('RGB'), dtype=float)
    keep = make_report.EMBED_DPI / 110                       # the figures are saved at 110 dpi
    assert decoded.shape == (round(484 * keep), round(440 * keep), 3)
    expected = np.asarray(photo.resize(decoded.shape[1::-1], Image.LANCZOS), dtype=float)
    assert np.abs(decoded - expected).mean() < 4.5   # of 255 levels (resampled, then JPEG)


def test_a_figure_shrunk_to_fit_keeps_at_most_embed_dpi_at_its_printed_size(tmp_path):
    plot = Image.new('RGB', (2000, 300), 'white')
    ImageDraw.Draw(plot).line([(0, 290), (1999, 10)], fill=(31, 119, 180), width=3)
    plot.save(tmp_path / 'wide.png')
    flowable = make_report.image_flowable(str(tmp_path / 'wide.png'), 300, 1e9)   # 300 pt = 4 1/6 inches wide
    assert flowable.drawWidth == pytest.approx(300)
    assert flowable.imageWidth == round(300 / 72 * make_report.EMBED_DPI)        # the pixels the PDF stores
    assert flowable.imageHeight == round(300 * flowable.imageWidth / 2000)
    small = make_report.image_flowable(str(tmp_path / 'wide.png'), 1e9, 1e9)    # printed at its saved size
    keep = min(1, make_report.EMBED_DPI / 110)                                   # never upsampled
    assert (small.imageWidth, small.imageHeight) == (round(2000 * keep), round(300 * keep))


def test_the_committed_report_stays_under_2_mib():
    # the repository's rule for tracked files; the figures are resampled and JPEG-encoded to keep it there
    assert os.path.getsize(os.path.join(ROOT, 'plots', 'report.pdf')) < 2 * 1024 ** 2


def test_every_question_has_a_written_answer_with_known_placeholders():
    answers, sections = make_report.parse_answers(open(make_report.DEFAULT_ANSWERS).read())
    assert list(answers) == make_report.QUESTION_IDS
    assert sections['References'].count('\n- ') >= 5 and {'Summary', 'Settings'} <= set(sections)
    for qid, answer in answers.items():
        assert answer.title and len(answer.body.split()) >= 60, qid
        for path, _ in make_report.PLACEHOLDER.findall(answer.body):
            assert path.split('.')[0] in make_report.HOW_TO_RUN, (qid, path)


def report_inputs():
    """The run folders of the README's make_report.py command: what the committed report.pdf is built from (other
    folders under plots/, such as plots/simsiam-questions, are not in it)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    command = text[text.index('python make_report.py'):text.index('--out plots/report.pdf')]
    return [word.replace('plots/', os.path.join(ROOT, 'plots') + '/') for word in command.split()
            if 'plots/' in word]


def test_committed_runs_resolve_every_placeholder_that_names_them():
    """A typo in a placeholder would print 'not measured' in the committed report: none may."""
    inputs = report_inputs()
    assert len(inputs) == 8 and all(os.path.exists(os.path.join(p.rpartition('=')[2], 'summary.json'))
                                    for p in inputs)
    runs = make_report.read_runs(inputs)
    text = open(make_report.DEFAULT_ANSWERS).read()
    filled = make_report.fill(text, runs)
    assert make_report.MISSING + 'not measured' not in filled and 'cannot compute' not in filled
    assert make_report.MISSING + 'not a number' not in filled


def test_bad_inputs_are_one_line_errors(tmp_path, two_runs, capsys):
    with pytest.raises(SystemExit) as exc:
        make_report.main([str(tmp_path)])
    assert exc.value.code == 2 and 'has no summary.json' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        make_report.main(two_runs + ['--answers', str(tmp_path / 'none.md'), '--out', str(tmp_path / 'r.pdf')])
    assert exc.value.code == 2 and 'cannot read the answers' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_report.main(two_runs + [two_runs[0]])
    assert 'two vae runs given' in capsys.readouterr().err


def test_a_file_that_is_not_a_summary_is_refused(tmp_path, capsys):
    (tmp_path / 'summary.json').write_text('{"model": "vae"}')
    with pytest.raises(SystemExit) as exc:
        make_report.main([str(tmp_path), '--out', str(tmp_path / 'r.pdf')])
    assert exc.value.code == 2 and 'is not a run summary' in capsys.readouterr().err
    (tmp_path / 'summary.json').write_text('{"model": ')
    with pytest.raises(SystemExit):
        make_report.main([str(tmp_path), '--out', str(tmp_path / 'r.pdf')])
    assert 'is unreadable' in capsys.readouterr().err


def test_a_run_given_as_key_equals_folder_answers_under_that_key(tmp_path, capsys):
    first = _run(tmp_path / 'a', 'simsiam', {'3.4': ['3.4_a.png']}, {'baseline': {'final_knn_top1': 30.0}})
    second = _run(tmp_path / 'b', 'simsiam', {'3.7': ['3.7_b.png']},
                  {'baseline': {'final_knn_top1': 31.0, 'git_commit': 'abc-dirty'}})
    runs = make_report.read_runs([first, f'simsiam-questions={second}'])
    assert make_report.fill('{{simsiam.baseline.final_knn_top1}} {{simsiam-questions.baseline.final_knn_top1}}',
                            runs) == '30 31'
    assert make_report.figure_source('3.4', runs) == 'simsiam' and make_report.figure_source('3.7', runs) == \
        'simsiam-questions'
    assert make_report.configuration_commits(runs['simsiam-questions'][1]) == ['baseline: abc-dirty']
    for bad, why in [(f'nope={second}', "unknown run key 'nope'"),
                     (f'simsiam-questions={_run(tmp_path / "v", "vae", {}, {})}', 'must be a simsiam run')]:
        with pytest.raises(SystemExit) as exc:
            make_report.main([bad, '--out', str(tmp_path / 'r.pdf')])
        assert exc.value.code == 2 and why in capsys.readouterr().err


def test_derived_numbers_are_computed_from_the_runs_and_the_schedule(two_runs):
    runs = make_report.read_runs(two_runs)
    # alphabar against a direct product of the template's linear betas
    betas = np.linspace(1e-4, 0.02, 1000)
    assert make_report.alphabar(249) == pytest.approx(np.prod(1 - betas[:250]), rel=1e-12)
    assert make_report.fill('{{= 1/sqrt(2048):.4f}}; {{= snr(0):.0f}}', runs) == '0.0221; 9999'
    assert make_report.fill('{{= $simsiam.baseline.final_knn_top1 - $simsiam.no-stop-grad.final_knn_top1 :.2f}}',
                            runs) == '18.91'
    missing = make_report.fill('{{= $ddpm.t_star * 2}} {{= $vae.device + 1}} {{= open(1)}}', runs)
    assert missing.count(make_report.MISSING) == 6
    assert 'not run yet' in missing and 'not a number: vae.device' in missing and 'cannot compute' in missing


def test_the_build_refuses_a_number_that_no_run_backs(two_runs, tmp_path, capsys, monkeypatch):
    runs = make_report.read_runs(two_runs)
    ok = ('The VAE trained 30 epochs at 8.35 bits/dim, kNN 28.9% (ResNet-18, bf16, 3.4 and 1.3b, Sec. 4.1). '
          'The paper reports 67.7% (Chen & He, 2021). Derived: {{= 1/sqrt(2048):.4f}}. `--lr 0.03` in code.')
    assert make_report.unbacked_numbers(ok, runs) == []
    bad = 'The kNN reached 57.3% here, and 2,893 nats.'
    assert [n for n, _ in make_report.unbacked_numbers(bad, runs)] == ['57.3', '2,893']
    assert [n for n, _ in make_report.unbacked_numbers('a share of 0.289 is 28.906%', runs)] == ['0.289']
    assert make_report.unbacked_numbers('For example, an error of 0.123 costs 0.0076 nats.', runs) == []
    # an answer's numbers are backed only by the runs it names: 30 is the VAE's epochs, not a SimSiam number
    answer = '## 3.4 Q\n\nkNN {{simsiam.baseline.final_knn_top1}} after 30 epochs.\n'
    assert [n for n, _ in make_report.unbacked_in_answers(answer, runs)] == ['30']
    assert make_report.unbacked_in_answers(answer.replace('30', '3'), runs) == []
    answers = tmp_path / 'answers.md'
    answers.write_text('## 1.3a Time\n\nThe run took 123.4 s.\n')
    make_report.main(two_runs + ['--answers', str(answers), '--out', str(tmp_path / 'r.pdf')])   # a draft: built
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(make_report, 'HOW_TO_RUN', {'vae': 'v', 'simsiam': 's'})   # now the whole report
    with pytest.raises(SystemExit) as exc:
        make_report.main(two_runs + ['--answers', str(answers), '--out', str(tmp_path / 'r.pdf')])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'states 123.4' in err and 'no given run backs it' in err


def test_captions_tables_and_the_appendix_are_rendered(two_runs, tmp_path):
    answers = tmp_path / 'answers.md'
    answers.write_text('## Summary\n\n| question | verdict |\n|---|---|\n| 3.4 | collapse at '
                       '{{simsiam.no-stop-grad.final_knn_top1:.1f}}% |\n\n## 1.3b Samples\n\n'
                       'Figure 1.3b_*.png: samples of {{vae.epochs}} epochs\n\nSome text.\n')
    parsed, sections = make_report.parse_answers(answers.read_text())
    assert parsed['1.3b'].captions == [('1.3b_*.png', 'samples of {{vae.epochs}} epochs')]
    assert 'Figure' not in parsed['1.3b'].body and 'Summary' in sections
    assert make_report.caption_of('1.3b_samples_epoch005.png', [('1.3b_*', 'at epoch {epoch}')]) == 'at epoch 5'
    out = tmp_path / 'r.pdf'
    make_report.main(two_runs + ['--answers', str(answers), '--out', str(out)])
    titles = outline_titles(out.read_bytes())
    assert 'Appendix A: every metric of every run' in titles and 'Appendix B: what the metric keys mean' in titles
    keys = make_report.read_keys(open(make_report.KEYS).read())
    assert keys['final_knn_top1'].endswith('after the last epoch, %.')   # an item continued on the next line


def test_every_metric_key_of_the_committed_runs_is_explained():
    keys = make_report.read_keys(open(make_report.KEYS).read())
    runs = make_report.read_runs(report_inputs())
    printed = {k for _, summary in runs.values() for k in make_report.metric_keys(summary['metrics'])}
    assert sorted(printed - set(keys)) == []


def test_the_committed_answers_state_no_number_that_no_run_backs():
    runs = make_report.read_runs(report_inputs())
    assert make_report.unbacked_in_answers(open(make_report.DEFAULT_ANSWERS).read(), runs) == []


def test_a_sparse_page_that_ends_no_section_is_reported(tmp_path):
    from reportlab.platypus import PageBreak, Paragraph
    make_report.fonts()
    styles = make_report.make_styles()
    story = [Paragraph('one line', styles['body']), PageBreak(), make_report.heading('A', 'h1', 0, styles),
             Paragraph('another line', styles['body']), PageBreak(), Paragraph('x ' * 3000, styles['body']),
             PageBreak(), Paragraph('last', styles['body'])]
    layout = make_report.render_pdf(story, str(tmp_path / 'r.pdf'))
    # page 1 is sparse but the next page opens a section; page 2 is sparse and the next does not; page 3 is full
    # (and runs on to page 4); the last page may be short
    assert layout.pages >= 4 and layout.sparse == [2]
