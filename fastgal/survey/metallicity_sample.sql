-- fastgal reference sample: SDSS spectroscopic galaxies with MPA-JHU gas-phase metallicities.
--
-- The default catalog query of `fastgal download OUT` (SkyServer SqlSearch, DR17); run it with
--     fastgal download data/sdss --limit 100
-- or paste it into https://skyserver.sdss.org/dr17/en/tools/search/sql.aspx.
-- This file ships inside the package (fastgal/metallicity_sample.sql); tools/metallicity_sample.sql
-- is a link to it.
--
-- One row per galaxy: the photometric objID (64-bit: keep it exact, never a float), its spectrum,
-- position and Petrosian sizes (petroR90_r sets the cutout scale), and the MPA-JHU
-- (Brinchmann+04, Tremonti+04) medians: oh_p50 = 12+log(O/H) as `metallicity`, stellar mass, SFR.
-- The cuts are the original study's (Wu & Boada's galaxy-cnns), including its lgm_tot_p50 > 0,
-- so the default sample is the published one.
--
-- Reliability: SDSS documents the MPA-JHU values of a spectrum with GalSpecInfo.reliable = 0 as not
-- reliable. The flag is returned as a column but not cut on, to keep the published sample; for a
-- cleaner sample uncomment the last line of the WHERE clause (AND i.reliable = 1), or filter
-- master.csv on the `reliable` column later.
--
-- Keep the query a single SELECT with no top-level ORDER BY: fastgal wraps it in
-- SELECT TOP n ... ORDER BY objID to apply --limit and to split a result that hits the
-- 500,000-row cap into objID ranges.
SELECT
  g.objID, s.specObjID, g.ra, g.dec, s.z, s.zErr,
  g.petroMag_r, g.petroR50_r, g.petroR90_r,
  g.modelMag_u, g.modelMag_g, g.modelMag_r, g.modelMag_i, g.modelMag_z,
  e.oh_p50 AS metallicity, e.oh_p16, e.oh_p84,
  e.lgm_tot_p50, e.sfr_tot_p50, e.specsfr_tot_p50, e.bptclass,
  x.d4000_n, l.h_alpha_flux, l.h_beta_flux, l.oiii_5007_flux, l.nii_6584_flux,
  i.reliable
FROM SpecObj AS s
  JOIN Galaxy AS g ON g.objID = s.bestObjID
  JOIN GalSpecInfo AS i ON i.specObjID = s.specObjID
  JOIN GalSpecLine AS l ON l.specObjID = s.specObjID
  JOIN GalSpecIndx AS x ON x.specObjID = s.specObjID
  JOIN GalSpecExtra AS e ON e.specObjID = s.specObjID
WHERE g.petroMag_r > 10 AND g.petroMag_r < 18                 -- bright enough for a clean spectrum
  AND g.modelMag_u - g.modelMag_r > 0                          -- u-r colour in (0, 6)
  AND g.modelMag_u - g.modelMag_r < 6
  AND g.modelMag_u > 10 AND g.modelMag_u < 25                  -- no missing or saturated bands
  AND g.modelMag_g > 10 AND g.modelMag_g < 25
  AND g.modelMag_r > 10 AND g.modelMag_r < 25
  AND g.modelMag_i > 10 AND g.modelMag_i < 25
  AND g.modelMag_z > 10 AND g.modelMag_z < 25
  AND s.rChi2 < 2                                              -- a good spectral fit
  AND s.zErr > 0 AND s.zErr < 0.01                             -- a secure redshift
  AND s.z > 0.02                                               -- the fibre samples more than a nucleus
  AND e.oh_p50 != -9999                                        -- MPA-JHU measured a metallicity
  AND e.lgm_tot_p50 > 0                                        -- and a stellar mass
  -- AND i.reliable = 1                                        -- optional: only MPA-JHU fits flagged reliable
