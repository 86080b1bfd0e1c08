"""Run inside Kolibri's own shell (`kolibri manage shell`): add, with Kolibri's own models, the rows its generateuserdata
leaves out (learner groups, ad hoc groups, course sessions and their assignments, bookmarks, device status,
user session logs, quiz logs, an anonymous log) and the per-learner lesson and quiz copies Kolibri makes for
single-user devices, so every synced table holds rows whose partitions Kolibri computed.
"""
import uuid
from kolibri.core.auth.models import Classroom, LearnerGroup, AdHocGroup, FacilityUser, Facility
from kolibri.core.auth.constants import role_kinds
from kolibri.core.lessons.models import Lesson, LessonAssignment
from kolibri.core.exams.models import Exam, ExamAssignment
from kolibri.core.courses.models import CourseSession, CourseSessionAssignment, UnitTestAssignment
from kolibri.core.bookmarks.models import Bookmark
from kolibri.core.device.models import LearnerDeviceStatus
from kolibri.core.logger.models import UserSessionLog, ExamLog, ExamAttemptLog, ContentSessionLog
from kolibri.core.lessons.single_user_assignment_utils import update_individual_syncable_lessons_from_assignments
from kolibri.core.exams.single_user_assignment_utils import update_individual_syncable_exams_from_assignments
from django.utils import timezone

facility = Facility.objects.first()
admin = FacilityUser.objects.filter(facility=facility, roles__kind=role_kinds.ADMIN).first() or FacilityUser.objects.filter(facility=facility).first()
made = 0
for n, classroom in enumerate(Classroom.objects.filter(parent=facility).order_by("name")):
    learners = list(FacilityUser.objects.filter(memberships__collection=classroom).order_by("username"))
    coach = FacilityUser.objects.filter(roles__collection=classroom).first() or admin
    group = LearnerGroup.objects.create(name=f"group {n}", parent=classroom)
    adhoc = AdHocGroup.objects.create(name=f"adhoc {n}", parent=classroom)
    for u in learners[:3]:
        group.add_learner(u)
    for u in learners[3:4]:
        adhoc.add_learner(u)
    cs = CourseSession.objects.create(course=uuid.uuid4().hex, title=f"course {n}", collection=classroom, created_by=coach, is_active=True)
    CourseSessionAssignment.objects.create(course_session=cs, collection=group, assigned_by=coach)
    CourseSessionAssignment.objects.create(course_session=cs, collection=classroom, assigned_by=coach)
    UnitTestAssignment.objects.create(course_session=cs, collection=classroom, unit_contentnode_id=uuid.uuid4().hex, test_type="pre", activated_by=coach)
    UnitTestAssignment.objects.create(course_session=cs, collection=adhoc, unit_contentnode_id=uuid.uuid4().hex, test_type="post", activated_by=coach)
    lesson = Lesson.objects.create(title=f"group lesson {n}", collection=classroom, created_by=coach, is_active=True, resources=[])
    LessonAssignment.objects.create(lesson=lesson, collection=group, assigned_by=coach)
    exam = Exam.objects.filter(collection=classroom).first()
    if exam is not None:
        exam.active = True
        exam.save()
        ExamAssignment.objects.create(exam=exam, collection=adhoc, assigned_by=coach)
    for u in learners[:2]:
        Bookmark.objects.create(user=u, contentnode_id=uuid.uuid4().hex, channel_id=uuid.uuid4().hex, content_id=uuid.uuid4().hex)
        LearnerDeviceStatus.objects.create(instance_id=uuid.uuid4().hex, user=u, status="InsufficientStorage", status_sentiment=-1)
        UserSessionLog.objects.create(user=u)
        if exam is not None:
            log = ExamLog.objects.create(exam=exam, user=u)
            now = timezone.now()
            ExamAttemptLog.objects.create(examlog=log, user=u, item="q1", content_id=uuid.uuid4().hex, start_timestamp=now, end_timestamp=now, time_spent=1.0, complete=True, correct=1.0, simple_answer="a", interaction_history=[])
    ContentSessionLog.objects.create(user=None, content_id=uuid.uuid4().hex, channel_id=uuid.uuid4().hex, start_timestamp=timezone.now(), kind="video")
    for u in learners:
        update_individual_syncable_lessons_from_assignments(u.id)
        update_individual_syncable_exams_from_assignments(u.id)
    made += 1
print(f"enriched: {made} classrooms")
